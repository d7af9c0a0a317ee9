package e2e_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/dbusapi/dbustest"
	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim"
	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

// The end-to-end tests run as root on a kernel with loop and dm-crypt (make e2e boots
// one in qemu): a private dbus-daemon, qubes-sim with the kernel backend, qcryptd and
// qcryptctl, all the shipped static binaries from $QCRYPT_E2E_BIN. The tests share one
// world and run in file order; each leaves the chain closed.

const target = "e2e"

// harness is the world the tests share.
type harness struct {
	dir, bin, socket, simDir, conf string
	real                           bool   // E2E_REAL_QUBESD: the Admin API is the real qubesd 4.3
	qrexecClient                   string // E2E_REAL_QREXEC: the real qrexec's client for qcryptd
	sim, daemon                    *exec.Cmd
	daemonLog                      string
	q                              *qubes.Client
	runner                         *qubes.Runner
	stopBus                        func()
}

var h *harness

func TestMain(m *testing.M) {
	if os.Getenv("QCRYPT_E2E") != "1" {
		fmt.Println("e2e: not run here; make e2e runs these tests on a real kernel")
		os.Exit(0)
	}
	var err error
	h, err = setup()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: cannot set up:", err)
		if h != nil {
			h.dumpLogs()
			h.stop()
		}
		os.Exit(1)
	}
	code := m.Run()
	if code != 0 || os.Getenv("E2E_LOGS") == "1" {
		h.dumpLogs()
	}
	h.stop()
	if code == 0 {
		if left := kernelLeftovers(); len(left) > 0 {
			fmt.Fprintf(os.Stderr, "e2e: the simulator left devices in the kernel: %v\n", left)
			code = 1
		}
	}
	os.Exit(code)
}

func setup() (*harness, error) {
	bin := os.Getenv("QCRYPT_E2E_BIN")
	if bin == "" {
		return nil, errors.New("QCRYPT_E2E_BIN must name the directory with qcryptd, qcryptctl and qubes-sim")
	}
	dir, err := os.MkdirTemp("", "qcrypt-e2e-")
	if err != nil {
		return nil, err
	}
	hs := &harness{dir: dir, bin: bin, socket: filepath.Join(dir, "qubesd.sock"), simDir: filepath.Join(dir, "sim"), conf: filepath.Join(dir, "conf")}
	addr, stop, err := dbustest.Start(dir, dbustest.Permissive)
	if err != nil {
		return hs, err
	}
	hs.stopBus = stop
	os.Setenv("DBUS_SYSTEM_BUS_ADDRESS", addr)

	args := []string{"serve", "--backend", "kernel", "--socket", hs.socket, "--state", hs.simDir, "--qubes-version", "4.3"}
	if dir := os.Getenv("E2E_REAL_QUBESD"); dir != "" {
		args = append(args, "--real-qubesd", dir)
		hs.real = true
	}
	if build := os.Getenv("E2E_REAL_QREXEC"); build != "" {
		args = append(args, "--real-qrexec", build)
		hs.qrexecClient = qubessim.QrexecClientPath(filepath.Join(hs.simDir, "qrexec"))
	}
	hs.sim = exec.Command(filepath.Join(bin, "qubes-sim"), args...)
	logf, _ := os.Create(filepath.Join(dir, "sim.log"))
	hs.sim.Stdout, hs.sim.Stderr = logf, logf
	if err := hs.sim.Start(); err != nil {
		return hs, err
	}
	hs.q = qubes.NewClient(hs.socket)
	hs.q.SetTimeout(2 * time.Minute)
	if !testkit.Within(5*time.Minute, func() bool { return hs.ping() == nil }) {
		return hs, errors.New("the simulator does not answer")
	}
	for _, vm := range [][]string{{"sys-usb", "DispVM"}, {"mediator", "AppVM"}, {"work", "AppVM"}} {
		if hs.real {
			break // the real qubesd's world has them
		}
		if out, err := hs.simctl("add-vm", vm[0], vm[1], "user"); err != nil {
			return hs, fmt.Errorf("add-vm %s: %w: %s", vm[0], err, out)
		}
	}
	if err := hs.q.Start(context.Background(), "sys-usb"); err != nil {
		return hs, err
	}
	hs.runner = qubes.NewRunner([]string{filepath.Join(bin, "qubes-sim"), "qrexec-client", "--socket", hs.socket})
	hs.runner.Timeout = 2 * time.Minute
	if err := os.MkdirAll(filepath.Join(hs.conf, target), 0o755); err != nil {
		return hs, err
	}
	return hs, hs.startDaemon()
}

func (hs *harness) stop() {
	if hs.daemon != nil && hs.daemon.ProcessState == nil {
		hs.daemon.Process.Signal(syscall.SIGTERM)
		_ = hs.daemon.Wait() // how it ended is in its log
	}
	if hs.sim != nil && hs.sim.Process != nil {
		// The simulator powers every qube off on SIGTERM: nothing stays in the kernel.
		hs.sim.Process.Signal(syscall.SIGTERM)
		_ = hs.sim.Wait() // how it ended is in its log
	}
	if hs.stopBus != nil {
		hs.stopBus()
	}
	os.RemoveAll(hs.dir)
}

func (hs *harness) dumpLogs() {
	for _, f := range []string{hs.daemonLog, filepath.Join(hs.dir, "sim.log")} {
		if data, err := os.ReadFile(f); err == nil {
			if len(data) > 40000 {
				data = data[len(data)-40000:]
			}
			fmt.Fprintf(os.Stderr, "--- %s (end)\n%s\n", filepath.Base(f), data)
		}
	}
}

// qrexecCommand is what qcryptd runs as qrexec-client: the real one, or the stand-in.
func (hs *harness) qrexecCommand() string {
	if hs.qrexecClient != "" {
		return hs.qrexecClient
	}
	return filepath.Join(hs.bin, "qubes-sim") + " qrexec-client --socket " + hs.socket
}

// startDaemon runs qcryptd on the e2e target and waits for its bus name.
func (hs *harness) startDaemon() error {
	hs.daemonLog = filepath.Join(hs.dir, fmt.Sprintf("qcryptd-%d.log", time.Now().UnixNano()))
	logf, _ := os.Create(hs.daemonLog)
	hs.daemon = exec.Command(filepath.Join(hs.bin, "qcryptd"), "--config-root", hs.conf, "--target", target,
		"--qubesd-socket", hs.socket, "--qrexec-client", hs.qrexecCommand(),
		"--state-dir", filepath.Join(hs.dir, "state"), "--dom0-root", hs.vmRoot("dom0"), "--log-level", "debug")
	hs.daemon.Stdout, hs.daemon.Stderr = logf, logf
	if err := hs.daemon.Start(); err != nil {
		return err
	}
	if !testkit.Within(30*time.Second, func() bool {
		c, err := dbusapi.Connect()
		if err == nil {
			c.Disconnect()
		}
		return err == nil
	}) {
		return errors.New("qcryptd did not take its bus name")
	}
	return nil
}

// mustSimctl runs a simulator control command that must succeed.
func (hs *harness) mustSimctl(t *testing.T, args ...string) {
	t.Helper()
	if out, err := hs.simctl(args...); err != nil {
		t.Fatalf("qubes-sim ctl %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func (hs *harness) simctl(args ...string) (string, error) {
	out, err := exec.Command(filepath.Join(hs.bin, "qubes-sim"), append([]string{"ctl", "--socket", hs.socket}, args...)...).CombinedOutput()
	return string(out), err
}

// vmRoot is the host directory of a qube's persistent file system.
// ping answers once the simulator's world is ready.
func (hs *harness) ping() error {
	_, err := hs.simctl("ping")
	return err
}

func (hs *harness) vmRoot(vm string) string { return filepath.Join(hs.simDir, "qubes", vm) }

// ctl runs qcryptctl and returns its output and exit status.
func ctl(t *testing.T, args ...string) (string, int) {
	t.Helper()
	return ctlWithInput(t, "", args...)
}

// ctlWithInput runs qcryptctl with input on stdin, in a session of its own: no terminal
// to ask on, so the passwords it answers qcryptd's questions with come from input.
func ctlWithInput(t *testing.T, input string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(filepath.Join(h.bin, "qcryptctl"), args...)
	cmd.Stdin = strings.NewReader(input)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	out, err := cmd.CombinedOutput()
	if cmd.ProcessState == nil {
		t.Fatalf("qcryptctl %s: %v", strings.Join(args, " "), err)
	}
	return string(out), cmd.ProcessState.ExitCode()
}

// mustCtl runs qcryptctl and fails the test unless it succeeds.
func mustCtl(t *testing.T, args ...string) string {
	t.Helper()
	start := time.Now()
	out, code := ctl(t, args...)
	if code != 0 {
		t.Fatalf("qcryptctl %s: exit %d:\n%s", strings.Join(args, " "), code, out)
	}
	t.Logf("qcryptctl %s: %.1f s", args[0], time.Since(start).Seconds())
	return out
}

// sh runs a script as root in a qube; a qrexec failure fails the test.
func sh(t *testing.T, vm, script string) qubes.Result {
	t.Helper()
	res, err := h.runner.Run(context.Background(), vm, script, nil)
	if err != nil {
		t.Fatalf("run in %s: %v (stderr %q)", vm, err, res.Stderr)
	}
	return res
}

func writeChain(t *testing.T, name, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(h.conf, target, name+".ini"), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	mustCtl(t, "reload")
}

func chainInfo(t *testing.T, name string) dbusapi.ChainInfo {
	t.Helper()
	c, err := dbusapi.Connect()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect()
	info, err := c.Chain(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return info
}

// waitState waits until the chain is in one of states and returns it.
func waitState(t *testing.T, name string, timeout time.Duration, states ...dbusapi.ChainState) dbusapi.ChainState {
	t.Helper()
	var last dbusapi.ChainInfo
	ok := testkit.Within(timeout, func() bool {
		c, err := dbusapi.Connect()
		if err != nil {
			return false
		}
		defer c.Disconnect()
		if last, err = c.Chain(context.Background(), name); err != nil {
			return false
		}
		for _, s := range states {
			if last.State == s {
				return true
			}
		}
		return false
	})
	if !ok {
		t.Fatalf("chain %s: state %q (%s), want one of %v after %s", name, last.State, last.LastError, states, timeout)
	}
	return last.State
}

// watchCauses subscribes to the chain changes of name (across qcryptd's restarts) and
// returns, once subscribed, the channel of their causes.
func watchCauses(t *testing.T, name string) <-chan dbusapi.Cause {
	t.Helper()
	c, err := dbusapi.Connect()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); c.Disconnect() })
	causes := make(chan dbusapi.Cause, 64)
	subscribed, failed := make(chan struct{}), make(chan error, 1)
	go func() {
		failed <- c.Watch(ctx, dbusapi.Watcher{Subscribed: func() { close(subscribed) }, Change: func(ev dbusapi.ChainEvent) {
			if ev.Chain == name {
				select {
				case causes <- ev.Reason.Cause:
				default: // the test has what it waits for
				}
			}
		}})
	}()
	select {
	case <-subscribed:
	case err := <-failed:
		t.Fatalf("cannot watch chain changes: %v", err)
	}
	return causes
}

// dmDevices maps the kernel's device-mapper names to their /dev/dm-N nodes.
func dmDevices() map[string]string {
	out := map[string]string{}
	dms, _ := filepath.Glob("/sys/block/dm-*")
	for _, p := range dms {
		if name, err := os.ReadFile(p + "/dm/name"); err == nil {
			out[strings.TrimSpace(string(name))] = "/dev/" + filepath.Base(p)
		}
	}
	return out
}

// kernelLeftovers lists every dm device and bound loop device in the kernel.
func kernelLeftovers() []string {
	var left []string
	for name := range dmDevices() {
		left = append(left, "dm "+name)
	}
	loops, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, p := range loops {
		b, _ := os.ReadFile(p)
		left = append(left, filepath.Base(filepath.Dir(filepath.Dir(p)))+" "+strings.TrimSpace(string(b)))
	}
	sort.Strings(left)
	return left
}

// attachments lists every attachment qubesd knows, as "backend:port>frontend".
func attachments(t *testing.T) []string {
	t.Helper()
	vms, err := h.q.ListVMs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, vm := range vms {
		if !qubes.IsRunning(vm.State) {
			continue
		}
		atts, err := h.q.Attached(context.Background(), vm.Name)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range atts {
			out = append(out, a.Backend+":"+a.Port+">"+vm.Name)
		}
	}
	return out
}

// requireClean fails unless no dm device, loop device or attachment is left.
func requireClean(t *testing.T, when string) {
	t.Helper()
	if left := kernelLeftovers(); len(left) > 0 {
		t.Errorf("%s: left in the kernel: %v", when, left)
	}
	if atts := attachments(t); len(atts) > 0 {
		t.Errorf("%s: attachments left: %v", when, atts)
	}
}

// contains reports whether the file or block device at path holds needle, read by the
// test itself (not by a tool in a qube).
func contains(t *testing.T, path string, needle []byte) bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("cannot read %s: %v", path, err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20+len(needle))
	carry := 0
	for {
		n, err := f.Read(buf[carry:])
		if bytes.Contains(buf[:carry+n], needle) {
			return true
		}
		if err != nil || n == 0 {
			return false
		}
		keep := len(needle) - 1
		if carry+n < keep {
			keep = carry + n
		}
		copy(buf, buf[carry+n-keep:carry+n])
		carry = keep
	}
}

// treeContains lists the regular files under root that hold needle.
func treeContains(t *testing.T, root string, needle []byte) []string {
	t.Helper()
	var hits []string
	_ = filepath.Walk(root, func(p string, info os.FileInfo, err error) error { // skips what it cannot read
		if err == nil && info.Mode().IsRegular() && contains(t, p, needle) {
			hits = append(hits, p)
		}
		return nil
	})
	return hits
}
