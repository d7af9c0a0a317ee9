package ctl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/godbus/dbus/v5"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

// fakeAPI is a qcryptd with canned answers; it records what it was asked.
type fakeAPI struct {
	calls []string
	fail  error
}

var fakeChains = []dbusapi.ChainInfo{
	{Name: "demo", State: "open", Target: "work", MountPoint: "/mnt/demo", Managed: true, Layers: []string{"sys-usb", "mediator", "work"}},
	{Name: "usb", State: "waiting", Waiting: "waiting for /dev/disk/by-label/USB in sys-usb", Target: "work", Managed: true, ReadOnly: true, Layers: []string{"sys-usb", "mediator", "work"}},
	{Name: "vault@work", State: "failed", LastError: "wrong key (cryptsetup: no key available with this passphrase)", Target: "work", Layers: []string{"sys-usb", "work"}},
}

func (f *fakeAPI) rec(s string, a ...any) error {
	f.calls = append(f.calls, fmt.Sprintf(s, a...))
	return f.fail
}

func (f *fakeAPI) Chains(context.Context) ([]dbusapi.ChainInfo, error) {
	return fakeChains, f.rec("Chains")
}

func (f *fakeAPI) Chain(_ context.Context, name string) (dbusapi.ChainInfo, error) {
	for _, c := range fakeChains {
		if c.Name == name {
			return c, nil
		}
	}
	return dbusapi.ChainInfo{}, &dbusapi.RemoteError{Name: dbusapi.ErrorPrefix + string(dbusapi.NoSuchChain), Msg: "no chain " + name}
}

func openStatus(name string, missing int) *chains.Status {
	st := &chains.Status{Chain: name, SourceVM: "sys-usb", SourceRunning: true, Source: chains.SourceLoop, Missing: missing,
		Hops: []chains.HopStatus{{VM: "mediator", Running: true, Attached: true, FrontendDev: "xvdi", KeyPresent: true, Decrypted: true},
			{VM: "work", Running: true, Attached: true, FrontendDev: "xvdi", KeyPresent: true, Decrypted: true, Mounted: true}}}
	if missing > 0 {
		st.Source = chains.SourceFile
		st.Hops[1] = chains.HopStatus{VM: "work"}
		st.Hops[0] = chains.HopStatus{VM: "mediator", Running: true, KeyPresent: true}
	}
	return st
}

func (f *fakeAPI) Status(_ context.Context, name string) (*chains.Status, error) {
	if name == "nope" {
		return nil, &dbusapi.RemoteError{Name: dbusapi.ErrorPrefix + string(dbusapi.NoSuchChain), Msg: `no chain "nope"`}
	}
	if name == "usb" {
		return openStatus(name, 6), f.rec("Status %s", name)
	}
	if name == "vault" {
		st := openStatus(name, 0)
		st.Hops[0].Segments = []chains.Segment{{Target: "crypt", Cipher: "aes-xts-plain64", KeyBits: 512}}
		st.Hops[1].Segments = []chains.Segment{{Target: "crypt", Cipher: "xchacha12,aes-adiantum-plain64", KeyBits: 256}}
		return st, f.rec("Status %s", name)
	}
	return openStatus(name, 0), f.rec("Status %s", name)
}

func (f *fakeAPI) StatusAdhoc(_ context.Context, s dbusapi.Spec) (*chains.Status, error) {
	return openStatus(s.Key+"@"+s.Destinations[len(s.Destinations)-1], 0), f.rec("StatusAdhoc %+v", s)
}

func (f *fakeAPI) Discover(context.Context) ([]dbusapi.Discovered, error) {
	return []dbusapi.Discovered{
		{Discovered: chains.Discovered{SourceVM: "sys-usb", SourcePort: "loop0", File: "/home/user/demo.luks", Key: "demo",
			Hops: []chains.DiscoveredHop{{VM: "mediator", FrontendDev: "xvdi", Port: "dm-0"}, {VM: "work", FrontendDev: "xvdi"}}}, ManagedBy: "demo"},
		{Discovered: chains.Discovered{SourceVM: "cloud", SourcePort: "loop3", File: "/srv/box.luks", ReadOnly: true,
			Hops: []chains.DiscoveredHop{{VM: "vault", FrontendDev: "xvdj"}}}},
	}, f.rec("Discover")
}

func (f *fakeAPI) Plan(_ context.Context, op, name string, spec *dbusapi.Spec, options map[string]dbus.Variant) ([]dbusapi.PlanStep, error) {
	return []dbusapi.PlanStep{{VM: "sys-usb", Desc: "set up a loop device for /home/user/demo.luks"}, {VM: "mediator", Desc: "attach sys-usb's loop device to mediator"}},
		f.rec("Plan %s %s %v %v", op, name, spec != nil, len(options))
}

func (f *fakeAPI) Reload(context.Context) (int, error) { return 2, f.rec("Reload") }

func (f *fakeAPI) Check(_ context.Context, target string) (bool, []string, error) {
	if target == "bad" {
		return false, []string{"/etc/qcryptd/bad/x.ini:3: key: empty (required)"}, f.rec("Check bad")
	}
	return true, nil, f.rec("Check %s", target)
}

func (f *fakeAPI) CloseAll(o chains.CloseOptions, stop bool) func(context.Context) ([]dbus.ObjectPath, error) {
	return func(context.Context) ([]dbus.ObjectPath, error) {
		return []dbus.ObjectPath{dbusapi.JobPath(7), dbusapi.JobPath(8)}, f.rec("CloseAll %+v stop=%v", o, stop)
	}
}

func (f *fakeAPI) RunJobs(ctx context.Context, start func(context.Context) ([]dbus.ObjectPath, error), progress func(dbusapi.JobInfo)) ([]dbusapi.JobResult, error) {
	paths, err := start(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]dbusapi.JobResult, len(paths))
	for i, p := range paths {
		// As the real client: each job's state is read (and reported) once first.
		if id, err := strconv.ParseUint(path.Base(string(p)), 10, 64); err == nil && progress != nil {
			progress(dbusapi.JobInfo{ID: id, Operation: dbusapi.OpClose, Chain: fmt.Sprintf("chain%d", id), State: dbusapi.JobRunning})
		}
		out[i] = dbusapi.JobResult{Success: true, Message: "closed"}
	}
	return out, nil
}

func (f *fakeAPI) starter(what string) dbusapi.Starter {
	return func(context.Context) (dbus.ObjectPath, error) { return dbusapi.JobPath(3), f.rec("%s", what) }
}

func (f *fakeAPI) Open(name string, o chains.OpenOptions) dbusapi.Starter {
	return f.starter(fmt.Sprintf("Open %s %+v", name, o))
}
func (f *fakeAPI) Close(name string, o chains.CloseOptions) dbusapi.Starter {
	return f.starter(fmt.Sprintf("Close %s %+v", name, o))
}
func (f *fakeAPI) OpenAdhoc(s dbusapi.Spec, o chains.OpenOptions) dbusapi.Starter {
	return f.starter(fmt.Sprintf("OpenAdhoc %s %+v", describe(s), o))
}
func (f *fakeAPI) CloseAdhoc(s dbusapi.Spec, o chains.CloseOptions) dbusapi.Starter {
	return f.starter(fmt.Sprintf("CloseAdhoc %s %+v", describe(s), o))
}
func (f *fakeAPI) KeystoreUnlock(dir string) dbusapi.Starter {
	return f.starter("KeystoreUnlock " + dir)
}
func (f *fakeAPI) KeystoreLock(dir string) dbusapi.Starter { return f.starter("KeystoreLock " + dir) }
func (f *fakeAPI) KeystoreInit(dir string) dbusapi.Starter { return f.starter("KeystoreInit " + dir) }
func (f *fakeAPI) KeystoreStatus(_ context.Context, dir string) (chains.KeystoreState, error) {
	if dir == "" {
		dir = chains.DefaultKeystoreDir
	}
	return chains.KeystoreState{Dir: dir, Exists: true, Open: true}, f.rec("KeystoreStatus %s", dir)
}
func (f *fakeAPI) LuksInit(s dbusapi.Spec) dbusapi.Starter {
	return f.starter(fmt.Sprintf("LuksInit %s", describe(s)))
}

// describe prints a spec with each passed file as what it is: the caller's file by
// name and open mode, the work file (a random name, unlinked) as such.
func describe(s dbusapi.Spec) string {
	file := func(f *os.File) string {
		if f == nil {
			return "-"
		}
		fl, _ := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
		mode := map[int]string{unix.O_RDONLY: "r", unix.O_WRONLY: "w", unix.O_RDWR: "rw"}[fl&unix.O_ACCMODE]
		if strings.Contains(f.Name(), ".qcrypt-luks-init-") {
			return "fd(work file, " + mode + ")"
		}
		return "fd(" + f.Name() + ", " + mode + ")"
	}
	files := func(m map[string]*os.File) string {
		var parts []string
		for _, k := range slices.Sorted(maps.Keys(m)) {
			parts = append(parts, k+"="+file(m[k]))
		}
		return "{" + strings.Join(parts, " ") + "}"
	}
	extra := "" // fields that came later, shown when set
	if len(s.Ciphers) > 0 {
		extra += fmt.Sprintf(" Ciphers:%v", s.Ciphers)
	}
	if s.MountOptions != "" {
		extra += " MountOptions:" + s.MountOptions
	}
	return fmt.Sprintf("{SourceVM:%s File:%s Key:%s Destinations:%v CryptOptions:%v MountPoint:%s ReadOnly:%v Autostart:%v "+
		"Inject:%s InjectKeystore:%v Size:%d KeySize:%d FS:%s KeyEntropy:%s ContainerEntropy:%s Container:%s Backups:%s Keystore:%s%s}",
		s.SourceVM, s.File, s.Key, s.Destinations, s.CryptOptions, s.MountPoint, s.ReadOnly, s.Autostart,
		files(s.Inject), s.InjectKeystore, s.Size, s.KeySize, s.FS, file(s.KeyEntropy), file(s.ContainerEntropy), file(s.Container), files(s.Backups), s.Keystore, extra)
}

func (f *fakeAPI) RunJob(ctx context.Context, start dbusapi.Starter, progress func(dbusapi.JobInfo)) (dbusapi.JobResult, error) {
	if _, err := start(ctx); err != nil {
		return dbusapi.JobResult{}, err
	}
	if progress != nil {
		for i := uint32(0); i <= 3; i++ {
			progress(dbusapi.JobInfo{Step: i, Steps: 3, StepDescription: fmt.Sprintf("step %d", i), Bytes: uint64(i) << 20, TotalBytes: 3 << 20})
			// More bytes within the step, at once (the clock stands): a terminal is not
			// redrawn for them.
			progress(dbusapi.JobInfo{Step: i, Steps: 3, StepDescription: fmt.Sprintf("step %d", i), Bytes: uint64(i)<<20 + 1<<19, TotalBytes: 3 << 20})
		}
	}
	return dbusapi.JobResult{Success: true, Message: "open"}, nil
}

func (f *fakeAPI) Watch(ctx context.Context, w dbusapi.Watcher) error {
	fn := w.Change
	fn(dbusapi.ChainEvent{Chain: "demo", State: "opening", Previous: "waiting", Reason: dbusapi.Because(dbusapi.CauseQubeStarted, "work started")})
	fn(dbusapi.ChainEvent{Chain: "demo", State: "open", Previous: "opening", Reason: dbusapi.Because(dbusapi.CauseDone, "open")})
	return f.rec("Watch")
}

func (f *fakeAPI) Disconnect()      {}
func (f *fakeAPI) Conn() *dbus.Conn { return nil }

// fakeJobs: qcryptd's own open of demo hangs; a luks-init waits behind nothing.
var fakeJobs = []dbusapi.JobInfo{
	{ID: 3, Operation: "close", Chain: "usb", State: "done"},
	{ID: 7, Operation: "open", Chain: "demo", State: "running", Step: 6, Steps: 6},
	{ID: 8, Operation: "luks-init", State: "running", UID: 1000},
}

func (f *fakeAPI) Jobs(context.Context) ([]dbusapi.JobInfo, error) { return fakeJobs, f.rec("Jobs") }
func (f *fakeAPI) CancelJob(_ context.Context, job dbus.ObjectPath) error {
	return f.rec("CancelJob %s", job)
}

// run runs qcryptctl against api and returns stdout, stderr and the exit status.
func run(api API, tty bool, args ...string) (string, string, int) {
	var out, errb bytes.Buffer
	connect := func() (API, error) {
		if api == nil {
			return nil, dbusapi.ErrQcryptdNotRunning
		}
		return api, nil
	}
	a := &app{out: &out, err: &errb, ctx: context.Background(), tty: tty, configDir: "../chains/testdata/check",
		now:     func() time.Time { return time.Date(2026, 11, 27, 9, 30, 0, 0, time.UTC) },
		connect: connect, running: connect, askDir: "/nonexistent"}
	code := a.main(args)
	return out.String(), errb.String(), code
}

func TestGoldenOutput(t *testing.T) {
	tests := []struct {
		name string
		args []string
		code int
		tty  bool
	}{
		{"list", []string{"list"}, 0, false},
		{"list-json", []string{"list", "--json"}, 0, false},
		{"list-exit-status", []string{"list", "-e"}, 2, false},
		{"json-before-command", []string{"--json", "list"}, 0, false},
		{"value-before-command", []string{"--mp", "/mnt/demo", "status", "demo"}, 0, false},
		{"version", []string{"--version"}, 0, false},
		{"status", []string{"status"}, 0, false},
		{"status-json", []string{"status", "--json"}, 0, false},
		{"status-chain", []string{"status", "demo"}, 0, false},
		{"status-chain-json", []string{"status", "--json", "demo"}, 0, false},
		{"status-missing-steps", []string{"status", "usb"}, 6, false},
		{"status-ciphers", []string{"status", "vault"}, 0, false},
		{"status-ciphers-json", []string{"status", "--json", "vault"}, 0, false},
		{"status-adhoc", []string{"status", "--", "sys-usb", "/home/user/demo.luks", "demo", "mediator", "work"}, 0, false},
		{"status-adhoc-mounted-anywhere", []string{"status", "--mp", "", "sys-usb", "/home/user/demo.luks", "demo", "mediator", "work"}, 0, false},
		{"status-unknown-chain", []string{"status", "nope"}, ExitStatusError, false},
		{"status-unknown-chain-json", []string{"--json", "status", "nope"}, ExitStatusError, false},
		{"open", []string{"open", "demo"}, 0, false},
		{"open-tty", []string{"open", "demo"}, 0, true},
		{"open-json", []string{"open", "demo", "--json"}, 0, false},
		{"open-adhoc", []string{"open", "-a", "--ro", "--mp", "/mnt/x", "--inj", "work", "testdata/inject.key", "--cy", "mediator", "--type plain", "sys-usb", "/c.luks", "k", "mediator", "work"}, 0, false},
		{"open-adhoc-ciphers", []string{"open", "--mp", "/mnt/x", "--mount-options", "nosuid,nodev,noexec", "--ciphers", "mediator", "aes-cbc-essiv:sha256 aes-xts-plain64", "sys-usb", "/c.luks", "k", "mediator", "work"}, 0, false},
		// The store is locked (the fake says open by another tool): unlocked first, then
		// the open names it for work's key; mediator's key comes from a file.
		{"keystore-status", []string{"keystore", "status"}, 0, false},
		{"keystore-status-json", []string{"keystore", "status", "--json", "/srv/keys"}, 0, false},
		{"keystore-usage", []string{"keystore", "open"}, ExitUsage, false},
		{"open-adhoc-keystore", []string{"open", "--inj", "work", "keystore://", "--inj", "mediator", "testdata/inject.key", "sys-usb", "/c.luks", "k", "mediator", "work"}, 0, false},
		{"close", []string{"close", "--force", "--eject", "demo"}, 0, false},
		{"close-sd", []string{"close", "--sd", "demo"}, 0, false},
		{"close-adhoc-json", []string{"close", "--json", "sys-usb", "/c.luks", "k", "work"}, 0, false},
		{"luks-init", []string{"luks-init", "--size", "64M", "--fs", "ext4", "--bak", "@TMP@/bak", "sys-usb", "/c.luks", "k", "mediator", "work"}, 0, false},
		{"luks-init-files", []string{"luks-init", "--wd", "@TMP@/wd", "--enkey", "testdata/inject.key", "--encon", "/dev/zero", "sys-usb", "/c.luks", "k", "work"}, 0, false},
		{"luks-init-backup-exists", []string{"luks-init", "--bak", "@TMP@/old", "sys-usb", "/c.luks", "k", "work"}, 1, false},
		{"plan", []string{"plan", "open", "demo"}, 0, false},
		{"plan-json", []string{"plan", "close", "--force", "--json", "demo"}, 0, false},
		{"check", []string{"check"}, 0, false},
		{"check-bad-json", []string{"check", "--json", "bad"}, 1, false},
		{"reload", []string{"reload"}, 0, false},
		{"reload-json", []string{"reload", "--json"}, 0, false},
		{"close-all", []string{"close-all", "--stop"}, 0, false},
		{"close-all-json", []string{"close-all", "--json"}, 0, false},
		{"cancel-chain", []string{"cancel", "demo"}, 0, false},
		{"cancel-job-json", []string{"cancel", "--json", "8"}, 0, false},
		{"cancel-nothing", []string{"cancel", "usb"}, 1, false},
		{"watch", []string{"watch"}, 0, false},
		{"watch-json", []string{"watch", "--json"}, 0, false},
		{"usage-unknown-option", []string{"open", "--bogus", "demo"}, ExitUsage, false},
		{"usage-adhoc-arity", []string{"open", "sys-usb", "/c.luks"}, ExitUsage, false},
		{"usage-no-command", []string{}, ExitUsage, false},
		{"help-open", []string{"open", "--help"}, 0, false},
		{"completion-bash", []string{"completion", "bash"}, 0, false},
		{"completion-zsh", []string{"completion", "zsh"}, 0, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			api := &fakeAPI{}
			// @TMP@ is a fresh directory (files the client makes go there), shown as @TMP@.
			tmp := t.TempDir()
			if err := os.MkdirAll(filepath.Join(tmp, "old"), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(tmp, "old", "work_k"), []byte("old key"), 0o600); err != nil {
				t.Fatal(err)
			}
			args := make([]string, len(tc.args))
			for i, a := range tc.args {
				args[i] = strings.ReplaceAll(a, "@TMP@", tmp)
			}
			out, errs, code := run(api, tc.tty, args...)
			out, errs = strings.ReplaceAll(out, tmp, "@TMP@"), strings.ReplaceAll(errs, tmp, "@TMP@")
			for i := range api.calls {
				api.calls[i] = strings.ReplaceAll(api.calls[i], tmp, "@TMP@")
			}
			if code != tc.code {
				t.Errorf("exit %d, want %d (stderr %q)", code, tc.code, errs)
			}
			got := fmt.Sprintf("$ qcryptctl %s\n%s--- stderr\n%s--- exit %d\n--- daemon calls\n%s\n", strings.Join(tc.args, " "), out, errs, code, strings.Join(api.calls, "\n"))
			testkit.Golden(t, filepath.Join("testdata/golden", tc.name+".txt"), got)
		})
	}
}

func TestDaemonNotRunning(t *testing.T) {
	_, errs, code := run(nil, false, "list")
	if code != ExitNotRunning || !strings.Contains(errs, "systemctl start qcryptd") {
		t.Errorf("exit %d stderr %q", code, errs)
	}
	// check works without the daemon, on the local files.
	out, _, code := run(nil, false, "check", "valid")
	if code != 0 || out != "All good.\n" {
		t.Errorf("local check: %d %q", code, out)
	}
	out, _, code = run(nil, false, "check", "invalid")
	if code != 1 || !strings.Contains(out, "ERROR: testdata/check/invalid/") && !strings.Contains(out, "ERROR: ../chains/testdata/check/invalid/") {
		t.Errorf("local check of an invalid target: %d %q", code, out)
	}
}

func TestAccessDeniedExitStatus(t *testing.T) {
	api := &fakeAPI{fail: &dbusapi.RemoteError{Name: "org.freedesktop.DBus.Error.AccessDenied", Msg: "access denied"}}
	if _, _, code := run(api, false, "list"); code != ExitDenied {
		t.Errorf("exit %d", code)
	}
	api = &fakeAPI{fail: errors.New("boom")}
	if _, _, code := run(api, false, "reload"); code != ExitFailed {
		t.Errorf("exit %d", code)
	}
}

func TestDocsAreGenerated(t *testing.T) {
	testkit.Golden(t, "../docs/qcryptctl.md", Markdown())
	for page, file := range map[string]string{"qcryptctl": "qcryptctl.1", "qcrypt.ini": "qcrypt.ini.5"} {
		testkit.Golden(t, "../docs/man/"+file, ManPages()[page])
	}
}
