package bustest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/dbusapi/dbustest"
	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim"
	"github.com/qcrypt/qcrypt/qubessim/simtest"
	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

// The integration tests run the real binaries: a private dbus-daemon with a system-bus
// configuration, qubes-sim with the demo world and qcryptd pointed at both.

var (
	binOnce sync.Once
	binDir  string
	binErr  error
)

func need(t testing.TB) {
	t.Helper()
	for _, tool := range []string{"dbus-daemon", "bwrap", "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("QCRYPT_REQUIRE_SANDBOX") == "1" {
				t.Fatalf("%s is needed (make deps)", tool)
			}
			t.Skipf("%s is not installed", tool)
		}
	}
}

// bin builds qcryptd and qubes-sim once (static, as shipped).
func bin(t testing.TB, name string) string {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "qcrypt-bin-")
		if binErr != nil {
			return
		}
		simtest.AtExit(func() { os.RemoveAll(binDir) })
		if binErr = os.Chmod(binDir, 0o755); binErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", binDir+"/", "github.com/qcrypt/qcrypt/cmd/qcryptd", "github.com/qcrypt/qcrypt/cmd/qubes-sim", "github.com/qcrypt/qcrypt/cmd/qcryptctl",
			"github.com/qcrypt/qcrypt/daemon/bustest/testdata/sigprobe", "github.com/qcrypt/qcrypt/daemon/bustest/testdata/fdflood")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			binErr = fmt.Errorf("%w: %s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return filepath.Join(binDir, name)
}

// world is one test's bus, simulator and daemon.
type world struct {
	t       testing.TB
	dir     string
	busAddr string
	busStop func()
	policy  string
	socket  string
	simDir  string
	conf    string // config root
	qubes   *qubes.Client
	daemon  *exec.Cmd
	logPath string
	real    bool // the Admin API is the real qubesd, and qrexec the real one
	// qrexecClient is the real qrexec's client for qcryptd ("": the stand-in's)
	qrexecClient string
	// daemonArgs are added to qcryptd's command line.
	daemonArgs []string
}

// worlds are the Admin API servers the integration scenarios run against: the
// simulator's own (R4.2 and R4.3) and the real qubesd 4.2 and 4.3.
var worlds = []string{"4.2", "4.3", "real-4.2", "real-4.3"}

const permissiveBus = dbustest.Permissive

func newWorld(t testing.TB, dialect, policy string) *world {
	t.Helper()
	need(t)
	dir, err := os.MkdirTemp("", "qcrypt-it-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	w := &world{t: t, dir: dir, socket: filepath.Join(dir, "qubesd.sock"), simDir: filepath.Join(dir, "sim"), conf: filepath.Join(dir, "conf")}
	if err := os.MkdirAll(w.simDir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The bus.
	addr, stop, err := dbustest.Start(dir, policy)
	if err != nil {
		t.Fatal(err)
	}
	w.busAddr, w.busStop, w.policy = addr, stop, policy
	t.Cleanup(func() { w.busStop() })
	// The simulator, maybe behind the real qubesd.
	args := []string{"serve", "--socket", w.socket, "--state", w.simDir, "--demo"}
	if v, ok := strings.CutPrefix(dialect, "real-"); ok {
		// Real qubesd and real qrexec: only Xen and the qubes' insides are simulated.
		args = append(args, "--qubes-version", v, "--real-qubesd", simtest.RealQubesd(t), "--real-qrexec", simtest.RealQrexec(t, v))
		w.real = true
		w.qrexecClient = qubessim.QrexecClientPath(filepath.Join(w.simDir, "qrexec"))
	} else {
		args = append(args, "--qubes-version", dialect)
	}
	simCmd := exec.Command(bin(t, "qubes-sim"), args...)
	simLog, _ := os.Create(filepath.Join(dir, "sim.log"))
	simCmd.Stdout, simCmd.Stderr = simLog, simLog
	if err := simCmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		simCmd.Process.Signal(syscall.SIGTERM)
		_ = simCmd.Wait() // its log, shown below on a failure, tells how it ended
		if t.Failed() {
			data, _ := os.ReadFile(filepath.Join(dir, "sim.log"))
			t.Logf("qubes-sim log:\n%s", tail(data, 20000))
			socks, _ := exec.Command("sh", "-c", "cd "+filepath.Join(w.simDir, "qrexec", "qubes")+" && for f in *; do echo $f $(readlink $f); done").CombinedOutput()
			t.Logf("qrexec sockets:\n%s", socks)
			logs, _ := filepath.Glob(filepath.Join(w.simDir, "qrexec", "log", "*.log"))
			for _, l := range logs {
				data, _ := os.ReadFile(l)
				t.Logf("%s:\n%s", filepath.Base(l), tail(data, 4000))
			}
		}
	})
	w.qubes = qubes.NewClient(w.socket)
	w.qubes.SetTimeout(time.Minute)
	testkit.Eventually(w.t, "the simulator is ready", 3*time.Minute, func() bool {
		return qubessim.Ping(w.socket) == nil
	})
	return w
}

// qrexecCommand is what qcryptd runs as qrexec-client.
func (w *world) qrexecCommand() string {
	if w.qrexecClient != "" {
		return w.qrexecClient
	}
	return bin(w.t, "qubes-sim") + " qrexec-client --socket " + w.socket
}

// restartBus stops the system bus and starts a new one at the same address, as a
// restart of dbus-broker does: every connection is lost.
func (w *world) restartBus() {
	w.t.Helper()
	w.busStop()
	os.Remove(filepath.Join(w.dir, "bus.sock"))
	_, stop, err := dbustest.Start(w.dir, w.policy)
	if err != nil {
		w.t.Fatal(err)
	}
	w.busStop = stop
}

// holdAutoOpenInWork makes work's agent hang and starts work: the automatic open of the
// demo chain decrypts layer 1 in mediator and then waits in work (a hung call ends only
// when it is killed or work dies).
func (w *world) holdAutoOpenInWork() {
	w.t.Helper()
	w.ctl("qrexec-fault", "work", "hang")
	if err := w.qubes.Start(bg, "work"); err != nil {
		w.t.Fatal(err)
	}
	testkit.Eventually(w.t, "the open decrypted layer 1 and waits in work", 30*time.Second, func() bool {
		// mediator is started by the open: only a running qube can be asked
		st, _ := w.qubes.CurrentState(bg, "mediator")
		return st == "Running" && len(w.sh("mediator", "ls /dev/mapper").Stdout) > 0
	})
}

// writeChain adds a chain file to the demo target.
func (w *world) writeChain(name, content string) {
	if err := os.MkdirAll(filepath.Join(w.conf, "demo"), 0o755); err != nil {
		w.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w.conf, "demo", name+".ini"), []byte(content), 0o644); err != nil {
		w.t.Fatal(err)
	}
}

var demoChain = qubessim.DemoChain("read-only=false", "startup interval=0")

// startDaemon runs qcryptd on the demo target and waits for its bus name.
func (w *world) startDaemon(extraEnv ...string) *exec.Cmd {
	w.t.Helper()
	// A world without chain files (ad-hoc chains only) has an empty target.
	if err := os.MkdirAll(filepath.Join(w.conf, "demo"), 0o755); err != nil {
		w.t.Fatal(err)
	}
	w.logPath = filepath.Join(w.dir, fmt.Sprintf("qcryptd-%d.log", time.Now().UnixNano()))
	logf, _ := os.Create(w.logPath)
	cmd := exec.Command(bin(w.t, "qcryptd"), "--config-root", w.conf, "--target", "demo", "--qubesd-socket", w.socket,
		"--qrexec-client", w.qrexecCommand(), "--state-dir", filepath.Join(w.dir, "state"),
		"--dom0-root", filepath.Join(w.simDir, "qubes", "dom0"), "--log-level", "debug")
	cmd.Args = append(cmd.Args, w.daemonArgs...)
	cmd.Env = append(append(os.Environ(), "DBUS_SYSTEM_BUS_ADDRESS="+w.busAddr), extraEnv...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		w.t.Fatal(err)
	}
	w.daemon = cmd
	w.t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Signal(syscall.SIGTERM)
			stopped := time.AfterFunc(time.Minute, func() {
				w.t.Errorf("qcryptd did not stop within a minute of SIGTERM")
				cmd.Process.Signal(syscall.SIGQUIT) // its goroutines go to the log
			})
			_ = cmd.Wait() // how it ended is in its log
			stopped.Stop()
		}
		if w.t.Failed() {
			data, _ := os.ReadFile(w.logPath)
			w.t.Logf("qcryptd log:\n%s", data)
		}
	})
	testkit.Eventually(w.t, "qcryptd owns its name", 20*time.Second, func() bool {
		c, err := dbusapi.ConnectAt(w.busAddr)
		if err == nil {
			c.Disconnect()
		}
		return err == nil
	})
	return cmd
}

// demoDaemon runs qcryptd on the demo chain and waits for the chain's state: "open"
// starts work first, "waiting" leaves it halted.
func demoDaemon(t testing.TB, state dbusapi.ChainState) (*world, *exec.Cmd, *dbusapi.Client) {
	t.Helper()
	w := newWorld(t, "4.2", permissiveBus)
	w.writeChain("demo", demoChain)
	if state == "open" {
		if err := w.qubes.Start(bg, "work"); err != nil {
			t.Fatal(err)
		}
	}
	d := w.startDaemon()
	c := w.client()
	w.waitState(c, "demo", state, 30*time.Second)
	return w, d, c
}

func (w *world) client() *dbusapi.Client {
	w.t.Helper()
	c, err := dbusapi.ConnectAt(w.busAddr)
	if err != nil {
		w.t.Fatal(err)
	}
	w.t.Cleanup(func() { c.Disconnect() })
	return c
}

// changes collects the chain state changes qcryptd signals, across its restarts.
type changes struct {
	mu   sync.Mutex
	seen []dbusapi.ChainEvent
	more chan struct{} // a value after each change
}

// watchChanges subscribes (with a connection of its own) and returns once subscribed:
// no later change is missed.
func (w *world) watchChanges() *changes {
	w.t.Helper()
	ch := &changes{more: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	w.t.Cleanup(cancel)
	subscribed, failed := make(chan struct{}), make(chan error, 1)
	c := w.client()
	go func() {
		failed <- c.Watch(ctx, dbusapi.Watcher{Subscribed: func() { close(subscribed) }, Change: func(ev dbusapi.ChainEvent) {
			ch.mu.Lock()
			ch.seen = append(ch.seen, ev)
			ch.mu.Unlock()
			select {
			case ch.more <- struct{}{}:
			default:
			}
		}})
	}()
	select {
	case <-subscribed:
	case err := <-failed:
		w.t.Fatalf("cannot watch chain changes: %v", err)
	}
	return ch
}

// waitFor waits for a change that ok accepts and returns it.
func (ch *changes) waitFor(t testing.TB, what string, timeout time.Duration, ok func(dbusapi.ChainEvent) bool) dbusapi.ChainEvent {
	t.Helper()
	deadline := time.After(timeout)
	for {
		ch.mu.Lock()
		for _, ev := range ch.seen {
			if ok(ev) {
				ch.mu.Unlock()
				return ev
			}
		}
		seen := append([]dbusapi.ChainEvent(nil), ch.seen...)
		ch.mu.Unlock()
		select {
		case <-ch.more:
		case <-deadline:
			t.Fatalf("no change %s within %v; seen: %+v", what, timeout, seen)
		}
	}
}

// waitState waits until the chain shows state.
func (w *world) waitState(c *dbusapi.Client, chain string, state dbusapi.ChainState, timeout time.Duration) dbusapi.ChainInfo {
	w.t.Helper()
	var ci dbusapi.ChainInfo
	testkit.Eventually(w.t, "chain "+chain+" is "+string(state), timeout, func() bool {
		var err error
		ci, err = c.Chain(context.Background(), chain)
		return err == nil && ci.State == state
	})
	return ci
}

func (w *world) sh(vm, script string) qubes.Result {
	w.t.Helper()
	r := qubes.NewRunner([]string{bin(w.t, "qubes-sim"), "qrexec-client", "--socket", w.socket})
	res, err := r.Run(context.Background(), vm, script, nil)
	if err != nil {
		w.t.Fatalf("in %s: %v", vm, err)
	}
	return res
}

func (w *world) ctl(args ...string) string {
	w.t.Helper()
	out, err := exec.Command(bin(w.t, "qubes-sim"), append([]string{"ctl", "--socket", w.socket}, args...)...).CombinedOutput()
	if err != nil {
		w.t.Fatalf("qubes-sim ctl %v: %v: %s", args, err, out)
	}
	return string(out)
}

func (w *world) log() string {
	data, _ := os.ReadFile(w.logPath)
	return string(data)
}

// tail is the end of a log: where a failure shows.
func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// expectReconnect subscribes to the manager's Summary now and returns a wait until
// qcryptd has lost qubesd and found it again ("waiting for qubesd" comes and goes).
func (w *world) expectReconnect(c *dbusapi.Client) (wait func(timeout time.Duration)) {
	w.t.Helper()
	rule := []dbus.MatchOption{dbus.WithMatchObjectPath(dbusapi.ManagerPath), dbus.WithMatchMember("PropertiesChanged")}
	if err := c.Conn().AddMatchSignal(rule...); err != nil {
		w.t.Fatal(err)
	}
	sigs := make(chan *dbus.Signal, 64)
	c.Conn().Signal(sigs)
	return func(timeout time.Duration) {
		w.t.Helper()
		defer c.Conn().RemoveSignal(sigs)
		deadline := time.After(timeout)
		lost := false
		for {
			select {
			case s := <-sigs:
				var iface string
				var changed map[string]dbus.Variant
				if len(s.Body) < 2 || dbus.Store(s.Body[:2], &iface, &changed) != nil {
					continue
				}
				summary, ok := changed["Summary"].Value().(string)
				if !ok {
					continue
				}
				if strings.Contains(summary, "waiting for qubesd") {
					lost = true
				} else if lost {
					return
				}
			case <-deadline:
				w.t.Fatalf("qcryptd did not reconnect to qubesd within %v", timeout)
			}
		}
	}
}
