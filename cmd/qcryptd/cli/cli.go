// Package cli is the qcryptd command: its flags, the wiring of the daemon to qubesd, the
// system bus and systemd, and its signals. The daemon package holds the loop and state.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/sirupsen/logrus"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/daemon"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/systemd"
)

// Version is set at build time.
var Version = "0.1.0-dev"

const usage = `usage: qcryptd [OPTIONS]              run the daemon
       qcryptd [OPTIONS] check [TARGET|DIR]   validate a config target offline

options:
`

// flags are qcryptd's options.
type flags struct {
	root, target, socket, qrexec, state, dom0Root, level, privateDir, machineID *string
	hookTimeout, cmdTimeout                                                     *time.Duration
	maxQrexec                                                                   *int
	version, man, markdown                                                      *bool
}

func defineFlags(fs *flag.FlagSet) flags {
	var f flags
	f.root = fs.String("config-root", chains.DefaultConfigRoot, "directory holding one directory per config target")
	f.target = fs.String("target", "default", "config target: the chains of `NAME` under --config-root")
	f.socket = fs.String("qubesd-socket", qubes.DefaultSocket, "qubesd Admin API socket")
	f.qrexec = fs.String("qrexec-client", qubes.DefaultQrexecClient, "qrexec-client command line, 'CMD [ARGS]' split on spaces")
	f.state = fs.String("state-dir", chains.DefaultStateDir, "directory for the journal")
	f.dom0Root = fs.String("dom0-root", "", "simulator only: run dom0 work through qrexec-client -d dom0 and read dom0 files under `DIR`")
	f.level = fs.String("log-level", "info", "debug, info, warning or error")
	f.privateDir = fs.String("luks-init-dir", "", "dom0 directory, root's alone and on a tmpfs, for luks-init's keys and container (default "+chains.DefaultPrivateDir+"; with --dom0-root /tmp/qcryptd-luks-init)")
	f.hookTimeout = fs.Duration("hook-timeout", daemon.DefaultHookTimeout, "how long a pre/post open/close command may run before it is killed")
	f.cmdTimeout = fs.Duration("command-timeout", 5*time.Minute, "how long one command in a qube may run before it is ended (and its step fails)")
	f.maxQrexec = fs.Int("max-qrexec", 4, "how many commands may run in qubes at once (parallel qrexec calls stall on Qubes, QubesOS/qubes-issues#6755)")
	f.machineID = fs.String("machine-id", "", "this machine's id in the cross-machine locks beside containers (default: /etc/machine-id)")
	f.version = fs.Bool("version", false, "print the version and exit")
	f.man = fs.Bool("man", false, "print the man page qcryptd(8) and exit")
	f.markdown = fs.Bool("markdown", false, "print docs/qcryptd.md and exit")
	return f
}

// Main is the qcryptd command.
func Main(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("qcryptd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage); fs.PrintDefaults() }
	f := defineFlags(fs)
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	if *f.version {
		fmt.Fprintln(stdout, "qcryptd", Version)
		return 0
	}
	if *f.man {
		fmt.Fprint(stdout, ManPage())
		return 0
	}
	if *f.markdown {
		fmt.Fprint(stdout, Markdown())
		return 0
	}
	if rest := fs.Args(); len(rest) > 0 {
		if rest[0] != "check" || len(rest) > 2 {
			fs.Usage()
			return 2
		}
		t := ""
		if len(rest) == 2 {
			t = rest[1]
		}
		return chains.Check(stdout, t, *f.root)
	}

	logger := logrus.New()
	logger.SetOutput(stderr)
	lvl, err := logrus.ParseLevel(*f.level)
	if err != nil {
		fmt.Fprintln(stderr, "qcryptd: --log-level:", err)
		return 2
	}
	logger.SetLevel(lvl)
	systemd.SetupLogging(logger, "qcryptd")
	log := logrus.NewEntry(logger)

	if *f.machineID == "" {
		data, err := os.ReadFile("/etc/machine-id")
		if err != nil {
			log.WithError(err).Warn("cannot read the machine id: read-write opens write no cross-machine lock")
		}
		*f.machineID = strings.TrimSpace(string(data))
	}
	if *f.machineID != "" && !chains.ValidMachineID(*f.machineID) {
		fmt.Fprintln(stderr, "qcryptd: --machine-id (or /etc/machine-id) is not 32 lower-case hex digits")
		return 2
	}
	client := qubes.NewClient(*f.socket)
	if *f.maxQrexec < 1 {
		fmt.Fprintln(stderr, "qcryptd: --max-qrexec must be at least 1")
		return 2
	}
	runner := qubes.NewRunner(strings.Fields(*f.qrexec))
	runner.MaxParallel = *f.maxQrexec
	runner.Timeout = *f.cmdTimeout
	var dom0 chains.Dom0 = qubes.LocalDom0{Runner: runner}
	if *f.dom0Root != "" {
		dom0 = qubes.RemoteDom0{Runner: runner, Root: filepath.Clean(*f.dom0Root)}
		if *f.privateDir == "" {
			*f.privateDir = "/tmp/qcryptd-luks-init" // the simulated dom0's /run lasts one command
		}
	}
	d, err := daemon.New(daemon.Options{ConfigRoot: *f.root, Target: *f.target, StateDir: *f.state, Qubes: client, Runner: runner,
		Dom0: dom0, Log: log, Notify: systemd.Notify, Watchdog: systemd.WatchdogInterval(),
		AsRoot: os.Geteuid() == 0, Version: Version, MachineID: *f.machineID, HookTimeout: *f.hookTimeout, PrivateDir: *f.privateDir})
	if err != nil {
		log.WithError(err).Error("cannot start")
		return 1
	}
	bus, err := connectBus(d, log)
	if err != nil {
		log.WithError(err).Error("cannot serve on the system bus")
		return 1
	}
	if err := systemd.Notify("READY=1"); err != nil {
		log.WithError(err).Warn("cannot notify systemd")
	}
	log.WithFields(logrus.Fields{"target": *f.target, "version": Version}).Info("qcryptd ready")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	go func() {
		shutdown := false
		for s := range sigs {
			if s == syscall.SIGTERM && !shutdown {
				// A system shutdown (not a stop or restart of qcryptd): qubes-core stops every
				// qube at once after qcryptd, so the chains are closed now, in order.
				sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
				stopping, err := systemd.SystemStopping(sctx)
				scancel()
				if err != nil {
					log.WithError(err).Warn("cannot tell a system shutdown from a stop of qcryptd: open chains stay open")
				}
				if stopping {
					log.Info("the system is shutting down: closing every open chain, target first")
					shutdown = true
					go d.SystemShutdown()
					continue
				}
			}
			if s == syscall.SIGHUP {
				go func() {
					n, err := d.Reload()
					if err != nil {
						log.WithError(err).Error("reload refused")
					} else {
						log.WithField("chains", n).Info("reloaded on SIGHUP")
					}
				}()
				continue
			}
			log.WithField("signal", s.String()).Info("stopping; open chains stay open")
			cancel()
			return
		}
	}()
	go bus.keep(ctx, d, log, cancel)
	err = d.Run(ctx)
	cancel() // it may have ended by itself (a close-all --stop, a system shutdown)
	if berr := bus.close(); err == nil {
		err = berr
	}
	if err != nil {
		log.WithError(err).Error("stopped with an error")
		return 1
	}
	log.Info("stopped")
	return 0
}

// busLink is qcryptd's presence on the system bus, kept across restarts of the bus.
type busLink struct {
	mu   sync.Mutex
	conn *dbus.Conn
	err  error // set when qcryptd gave up the bus (its name taken): Main fails
}

// connectBus connects, exports d's objects and takes the name (the readiness signal).
// Call before d runs.
func connectBus(d *daemon.Daemon, log *logrus.Entry) (*busLink, error) {
	conn, err := dbusapi.ConnectServer()
	if err != nil {
		return nil, err
	}
	srv := dbusapi.NewServer(conn, d, log)
	d.SetPublisher(srv)
	if err := srv.Export(); err != nil {
		conn.Close()
		return nil, fmt.Errorf("cannot export the D-Bus objects: %w", err)
	}
	if err := srv.RequestName(); err != nil {
		conn.Close()
		return nil, err
	}
	return &busLink{conn: conn}, nil
}

// keep watches the connection while d runs: when the bus goes away (dbus-broker or
// dbus-daemon restarted) it connects again, publishes the current state and takes the
// name back. Jobs and chains are untouched meanwhile. If the name is taken by then,
// stop ends the daemon.
func (b *busLink) keep(ctx context.Context, d *daemon.Daemon, log *logrus.Entry, stop func()) {
	for {
		b.mu.Lock()
		conn := b.conn
		b.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-conn.Context().Done():
		}
		log.Warn("lost the system bus; connecting again")
		delay := 100 * time.Millisecond
		for {
			err := b.reconnect(d, log)
			if err == nil {
				log.Info("back on the system bus")
				break
			}
			if errors.Is(err, errNameTaken) {
				log.WithError(err).Error("cannot serve on the system bus again; stopping")
				b.mu.Lock()
				b.err = err
				b.mu.Unlock()
				stop()
				return
			}
			log.WithError(err).Debug("cannot reach the system bus yet")
			select {
			case <-ctx.Done():
				return
			case <-time.After(delay):
			}
			delay = min(2*delay, 5*time.Second)
		}
	}
}

var errNameTaken = errors.New("the bus name is taken")

func (b *busLink) reconnect(d *daemon.Daemon, log *logrus.Entry) error {
	conn, err := dbusapi.ConnectServer()
	if err != nil {
		return err
	}
	srv := dbusapi.NewServer(conn, d, log)
	if err := d.Republish(srv, srv.Export); err != nil {
		conn.Close()
		return err
	}
	if err := srv.RequestName(); err != nil {
		taken := conn.Connected()
		conn.Close()
		if taken {
			return fmt.Errorf("%w: %w", errNameTaken, err)
		}
		return err
	}
	b.mu.Lock()
	b.conn = conn
	b.mu.Unlock()
	return nil
}

// close gives the name up and disconnects; it reports why the bus was given up, if so.
func (b *busLink) close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conn.Connected() {
		// The bus gives the name up with the connection anyway.
		_, _ = b.conn.ReleaseName(dbusapi.BusName)
	}
	b.conn.Close()
	return b.err
}
