package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/systemd"
)

// Exit statuses (docs/qcryptctl.md). status CHAIN exits with the number of missing steps.
const (
	ExitOK          = 0
	ExitFailed      = 1
	ExitUsage       = 2
	ExitStatusError = 64  // status CHAIN could not tell (or the chain is in a strange state)
	ExitNotRunning  = 69  // qcryptd is not running
	ExitInterrupted = 130 // Ctrl-C: the job was canceled (and rolled back)
	ExitDenied      = 77  // caller not allowed
)

// API is what qcryptctl needs of qcryptd (*dbusapi.Client has it).
type API interface {
	Chains(ctx context.Context) ([]dbusapi.ChainInfo, error)
	Chain(ctx context.Context, name string) (dbusapi.ChainInfo, error)
	Status(ctx context.Context, name string) (*chains.Status, error)
	StatusAdhoc(ctx context.Context, spec dbusapi.Spec) (*chains.Status, error)
	Discover(ctx context.Context) ([]dbusapi.Discovered, error)
	Plan(ctx context.Context, op, name string, spec *dbusapi.Spec, options map[string]dbus.Variant) ([]dbusapi.PlanStep, error)
	Reload(ctx context.Context) (int, error)
	Check(ctx context.Context, target string) (bool, []string, error)
	CloseAll(o chains.CloseOptions, stop bool) func(context.Context) ([]dbus.ObjectPath, error)
	Open(name string, o chains.OpenOptions) dbusapi.Starter
	Close(name string, o chains.CloseOptions) dbusapi.Starter
	OpenAdhoc(spec dbusapi.Spec, o chains.OpenOptions) dbusapi.Starter
	CloseAdhoc(spec dbusapi.Spec, o chains.CloseOptions) dbusapi.Starter
	LuksInit(spec dbusapi.Spec) dbusapi.Starter
	RunJob(ctx context.Context, start dbusapi.Starter, progress func(dbusapi.JobInfo)) (dbusapi.JobResult, error)
	RunJobs(ctx context.Context, start func(context.Context) ([]dbus.ObjectPath, error), progress func(dbusapi.JobInfo)) ([]dbusapi.JobResult, error)
	Watch(ctx context.Context, w dbusapi.Watcher) error
	Jobs(ctx context.Context) ([]dbusapi.JobInfo, error)
	CancelJob(ctx context.Context, job dbus.ObjectPath) error
	KeystoreUnlock(dir string) dbusapi.Starter
	KeystoreLock(dir string) dbusapi.Starter
	KeystoreInit(dir string) dbusapi.Starter
	KeystoreStatus(ctx context.Context, dir string) (chains.KeystoreState, error)
	// Conn is the system bus connection (nil: none), for logind.
	Conn() *dbus.Conn
	Disconnect()
}

// app is one invocation.
type app struct {
	out, err  io.Writer
	connect   func() (API, error)
	api       API
	tty       bool // out is a terminal: progress bars
	ctx       context.Context
	configDir string // for check without a daemon
	session   func() (*dbus.Conn, error)
	running   func() (API, error)                       // qcryptd if it runs: never started for the question
	watcher   func() (API, error)                       // the system bus, qcryptd running or not
	qubes     func(context.Context) ([]qubes.VM, error) // qubesd's qubes, for completion
	now       func() time.Time
	files     []*os.File // opened for qcryptd, closed at the end
	json      bool       // --json: a failure is a JSON object on stdout too ...
	printed   bool       // ... unless the command printed its JSON result already
	askDir    string     // where qcryptd asks for passwords (systemd's directory)
	password  func(ctx context.Context, prompt string) ([]byte, error)
}

// Version is set at build time (make: git describe).
var Version = "0.1.0-dev"

// Main runs qcryptctl.
func Main(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a := &app{out: stdout, err: stderr, ctx: ctx, configDir: chains.DefaultConfigRoot, tty: isTerminal(stdout),
		connect: func() (API, error) { return dbusapi.Connect() }, session: func() (*dbus.Conn, error) { return dbus.ConnectSessionBus() },
		running: func() (API, error) { return dbusapi.ConnectRunning() },
		watcher: func() (API, error) { return dbusapi.ConnectBus() },
		qubes:   qubes.NewClient(qubes.DefaultSocket).ListVMs,
		now:     time.Now, askDir: systemd.AskPasswordDir, password: readPassword}
	return a.main(args[1:])
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

func (a *app) main(args []string) int {
	if len(args) == 0 {
		a.usage(a.err)
		return ExitUsage
	}
	switch args[0] {
	case "-h", "--help":
		a.usage(a.out)
		return ExitOK
	case "--version":
		fmt.Fprintln(a.out, "qcryptctl", Version)
		return ExitOK
	case completeCommand:
		return a.printCompletions(args[1:])
	}
	// Options may come before the command too (qcryptctl --json list): the command is
	// the first argument that names one, before any "--".
	at := 0
	for i, arg := range args {
		if arg == "--" {
			break
		}
		if lookup(arg) != nil {
			at = i
			break
		}
	}
	c := lookup(args[at])
	if c == nil {
		fmt.Fprintf(a.err, "qcryptctl: unknown command %q\n\n", args[at])
		a.usage(a.err)
		return ExitUsage
	}
	p, err := parse(c, append(append([]string{}, args[:at]...), args[at+1:]...))
	if err != nil {
		fmt.Fprintf(a.err, "qcryptctl %s: %v\nusage: qcryptctl %s %s\n", c.name, err, c.name, c.args)
		return ExitUsage
	}
	if p.help {
		a.commandHelp(a.out, c)
		return ExitOK
	}
	a.json = p.flags["--json"]
	defer func() {
		if a.api != nil {
			a.api.Disconnect()
		}
		for _, f := range a.files {
			f.Close()
		}
	}()
	return a.exit(c.run(a, p))
}

// client connects on first use.
func (a *app) client() (API, error) {
	if a.api == nil {
		api, err := a.connect()
		if err != nil {
			return nil, err
		}
		a.api = api
	}
	return a.api, nil
}

// exitError carries an exit status other than ExitFailed; with err nil the command
// has said what there was to say.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return ""
	}
	return e.err.Error()
}

func (e *exitError) Unwrap() error { return e.err }

// exitCode ends a command with code and nothing more to print.
func exitCode(code int) error {
	if code == ExitOK {
		return nil
	}
	return &exitError{code: code}
}

// usageErr is a wrong command line.
func usageErr(msg string) error { return &exitError{code: ExitUsage, err: errors.New(msg)} }

// exit prints a command's error and maps it to the exit status: the one place that
// does. qcryptd not running and a refused caller have their own statuses whatever the
// command.
func (a *app) exit(err error) int {
	if err == nil {
		return ExitOK
	}
	code := ExitFailed
	var ee *exitError
	if errors.As(err, &ee) {
		code = ee.code
	}
	switch {
	case errors.Is(err, dbusapi.ErrQcryptdNotRunning):
		code = ExitNotRunning
	case dbusapi.IsAccessDenied(err):
		code = ExitDenied
	}
	msg := err.Error()
	if a.json && !a.printed {
		// Scripts read one JSON document from stdout, whatever happened.
		a.printJSON(errorJSON{msg, code})
	}
	if msg != "" {
		fmt.Fprintln(a.err, "qcryptctl:", msg)
	}
	return code
}

// parsed is a command line after option parsing.
type parsed struct {
	flags  map[string]bool
	values map[string][]string // arity 1: one per use; arity 2: pairs flattened
	args   []string
	help   bool
}

func (p *parsed) value(name string) string {
	if v := p.values[name]; len(v) > 0 {
		return v[len(v)-1]
	}
	return ""
}

// parse accepts options anywhere (as the original), "--" to end them.
func parse(c *command, args []string) (*parsed, error) {
	p := &parsed{flags: map[string]bool{}, values: map[string][]string{}}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			p.args = append(p.args, args[i+1:]...)
			break
		}
		if a == "-h" || a == "--help" {
			p.help = true
			continue
		}
		if !strings.HasPrefix(a, "-") || a == "-" {
			p.args = append(p.args, a)
			continue
		}
		name, val, hasVal := strings.Cut(a, "=")
		var spec *flagSpec
		for j := range c.flags {
			if c.flags[j].long == name || c.flags[j].short != "" && c.flags[j].short == name {
				spec = &c.flags[j]
			}
		}
		if spec == nil {
			return nil, fmt.Errorf("unknown option %s", name)
		}
		switch spec.arity {
		case 0:
			if hasVal {
				return nil, fmt.Errorf("%s takes no value", name)
			}
			p.flags[spec.long] = true
		default:
			var vals []string
			if hasVal {
				vals = append(vals, val)
			}
			for len(vals) < spec.arity {
				if i+1 >= len(args) {
					return nil, fmt.Errorf("%s needs %d value(s)", name, spec.arity)
				}
				i++
				vals = append(vals, args[i])
			}
			if !spec.repeat && len(p.values[spec.long]) > 0 {
				return nil, fmt.Errorf("%s given twice", name)
			}
			p.values[spec.long] = append(p.values[spec.long], vals...)
		}
	}
	return p, nil
}

// spec builds an ad-hoc chain from SOURCE_VM FILE KEY DST... and the options; errors
// are usage errors.
func (p *parsed) spec() (dbusapi.Spec, error) {
	if len(p.args) < 4 {
		return dbusapi.Spec{}, errors.New("needs SOURCE_VM FILE KEY DST (one or more destinations)")
	}
	s := dbusapi.Spec{SourceVM: p.args[0], File: p.args[1], Key: p.args[2], Destinations: p.args[3:],
		MountPoint: p.value("--mp"), MountOptions: p.value("--mount-options"), ReadOnly: p.flags["--ro"], Autostart: p.flags["--autostart"]}
	// --mp "" is the original's "mounted anywhere" (status); it mounts nothing.
	s.MountAnywhere = len(p.values["--mp"]) > 0 && s.MountPoint == ""
	pairs := func(name string) map[string]string {
		v := p.values[name]
		if len(v) == 0 {
			return nil
		}
		m := map[string]string{}
		for i := 0; i+1 < len(v); i += 2 {
			m[v[i]] = v[i+1]
		}
		return m
	}
	s.CryptOptions = pairs("--cy")
	s.Ciphers = pairs("--ciphers")
	for vm, f := range pairs("--inj") {
		dir, isStore, err := chains.ParseKeystoreRef(f)
		switch {
		case err != nil:
			return s, fmt.Errorf("--inj %s: %w", vm, err)
		case isStore:
			if s.InjectKeystore == nil {
				s.InjectKeystore = map[string]string{}
			}
			s.InjectKeystore[vm] = dir
		}
	}
	return s, nil
}

// injectFiles opens the --inj key files with the caller's own rights, for qcryptd to
// read from the descriptors: it never opens a dom0 path a caller names.
func (a *app) injectFiles(p *parsed, s *dbusapi.Spec) error {
	v := p.values["--inj"]
	for i := 0; i+1 < len(v); i += 2 {
		if _, isStore := s.InjectKeystore[v[i]]; isStore {
			continue // qcryptd reads it from the key store
		}
		f, err := a.open(v[i+1], os.O_RDONLY, 0)
		if err != nil {
			return fmt.Errorf("--inj %s: %w", v[i], err)
		}
		if s.Inject == nil {
			s.Inject = map[string]*os.File{}
		}
		s.Inject[v[i]] = f
	}
	return nil
}

// open opens a dom0 file with the caller's own rights; it is closed when qcryptctl ends.
func (a *app) open(name string, flag int, perm os.FileMode) (*os.File, error) {
	f, err := os.OpenFile(name, flag|syscall.O_CLOEXEC, perm)
	if err != nil {
		return nil, err
	}
	a.files = append(a.files, f)
	return f, nil
}

// printJSON writes v as indented JSON.
func (a *app) printJSON(v any) {
	a.printed = true
	enc := json.NewEncoder(a.out)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		fmt.Fprintf(a.err, "qcryptctl: cannot write JSON: %v\n", err)
	}
}
