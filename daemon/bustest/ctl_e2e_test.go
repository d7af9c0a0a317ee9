package bustest

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubessim/memkernel"
	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

// qcryptctl runs the real client binary.
func (w *world) qcryptctl(args ...string) (string, int) {
	w.t.Helper()
	cmd := exec.Command(bin(w.t, "qcryptctl"), args...)
	cmd.Env = append(cmd.Environ(), "DBUS_SYSTEM_BUS_ADDRESS="+w.busAddr)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		w.t.Fatalf("qcryptctl %v: %v", args, err)
	}
	return string(out), cmd.ProcessState.ExitCode()
}

func TestQcryptctlEndToEnd(t *testing.T) {
	t.Parallel()
	w := newWorld(t, "4.3", permissiveBus)
	w.writeChain("demo", demoChain)
	d := w.startDaemon()
	c := w.client()
	w.waitState(c, "demo", "waiting", 20*time.Second)

	expect := func(wantCode int, wantOut string, args ...string) string {
		t.Helper()
		out, code := w.qcryptctl(args...)
		if code != wantCode || !strings.Contains(out, wantOut) {
			t.Errorf("qcryptctl %s: exit %d, output:\n%s\nwant exit %d and %q", strings.Join(args, " "), code, out, wantCode, wantOut)
		}
		return out
	}
	expect(0, "waiting for work", "list")
	expect(10, "demo: closed (10 steps missing)", "status", "demo")
	expect(0, "All good.", "check")
	expect(0, "1 chains configured", "reload")
	expect(2, "unknown option --bogus", "open", "--bogus", "demo")

	adhoc := []string{"sys-usb", "/home/user/vault.luks", "vault", "mediator", "work"}
	expect(0, "[6/6] done", append([]string{"luks-init", "-a", "--size", "48M", "--fs", "ext4"}, adhoc...)...)
	expect(0, "mount the plaintext on /mnt/vault", append([]string{"plan", "open", "--mp", "/mnt/vault"}, adhoc...)...)
	out := expect(0, "", append([]string{"open", "--json", "--mp", "/mnt/vault"}, adhoc...)...)
	var res struct {
		Success bool   `json:"success"`
		Message string `json:"message"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || !res.Success {
		t.Errorf("open --json: %q %v", out, err)
	}
	expect(0, "vault@work (ad-hoc)  open", "list")
	expect(0, "vault@work: open (0 steps missing)", append([]string{"status", "--mp", "/mnt/vault"}, adhoc...)...)
	w.sh("work", "echo e2e > /mnt/vault/f")
	expect(0, "closed", append([]string{"close"}, adhoc...)...)
	expect(0, "vault", append([]string{"open", "--mp", "/mnt/vault"}, adhoc...)...)
	if got := string(w.sh("work", "cat /mnt/vault/f").Stdout); got != "e2e\n" {
		t.Errorf("after reopen: %q", got)
	}
	expect(0, "2 chains closed", "close-all")

	d.Process.Signal(syscall.SIGTERM)
	_ = d.Wait() // ended by a signal we sent; its status is not the point
	expect(69, "qcryptd is not running", "list")
}

func TestQcryptctlCtrlCCancelsTheJob(t *testing.T) {
	t.Parallel()
	w, _, c := demoDaemon(t, "waiting")
	// The chain would open on its own once work runs; close it and hold the next open in
	// work, whose agent hangs (a canceled call there ends: nothing of it comes later).
	if err := w.qubes.Start(bg, "work"); err != nil {
		t.Fatal(err)
	}
	w.waitState(c, "demo", "open", 30*time.Second)
	if out, code := w.qcryptctl("close", "demo"); code != 0 {
		t.Fatalf("close: %d %s", code, out)
	}
	w.ctl("qrexec-fault", "work", "hang")
	cmd := exec.Command(bin(t, "qcryptctl"), "open", "demo")
	cmd.Env = append(cmd.Environ(), "DBUS_SYSTEM_BUS_ADDRESS="+w.busAddr)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(w.t, "the open decrypted layer 1 and waits in work", 30*time.Second, func() bool {
		return len(w.sh("mediator", "ls /dev/mapper").Stdout) > 0
	})
	// The call under way stays hung; the rollback's calls to work are answered.
	w.ctl("qrexec-fault", "work", "none")
	cmd.Process.Signal(syscall.SIGINT)
	_ = cmd.Wait() // its exit code is checked next
	if code := cmd.ProcessState.ExitCode(); code != 130 || !strings.Contains(out.String(), "canceled") {
		t.Errorf("Ctrl-C: exit %d, output:\n%s", code, out.String())
	}
	st, err := c.Status(bg, "demo")
	if err != nil || !st.Closed() {
		t.Errorf("after Ctrl-C the open was not rolled back: %+v %v", st, err)
	}
	// Rolled back is closed, not failed; status and list agree.
	if ci, err := c.Chain(bg, "demo"); err != nil || ci.State != "closed" {
		t.Errorf("after Ctrl-C the chain is %+v %v, want closed", ci, err)
	}
}

// TestAdhocIdentity: an ad-hoc chain is its whole spec. Close and status of a spec that
// is not the open chain are refused and touch nothing; a failed open does not stick.
func TestAdhocIdentity(t *testing.T) {
	t.Parallel()
	w := newWorld(t, "4.3", permissiveBus)
	w.writeChain("other", strings.NewReplacer("key=demo", "key=other", "demo.luks", "other.luks").Replace(demoChain))
	w.startDaemon()
	if err := w.qubes.Start(bg, "work"); err != nil {
		t.Fatal(err)
	}
	spec := []string{"sys-usb", "/home/user/demo.luks", "demo", "mediator", "work"}
	run := func(wantCode int, wantOut string, args ...string) {
		t.Helper()
		out, code := w.qcryptctl(args...)
		if code != wantCode || !strings.Contains(out, wantOut) {
			t.Errorf("qcryptctl %s: exit %d %s\nwant exit %d and %q", strings.Join(args, " "), code, out, wantCode, wantOut)
		}
	}
	// A failed open (no such qube) leaves nothing that a later open would trip over.
	run(1, "qube nope does not exist", "open", "nope", "/home/user/demo.luks", "demo", "mediator", "work")
	run(0, "open", append([]string{"open"}, spec...)...)
	wrongs := map[string][]string{
		"wrong source":     {"mediator", "/home/user/demo.luks", "demo", "work"},
		"wrong file":       {"sys-usb", "/home/user/x.luks", "demo", "mediator", "work"},
		"skips the middle": {"sys-usb", "/home/user/demo.luks", "demo", "work"},
		"wrong key":        {"sys-usb", "/home/user/demo.luks", "badkey", "mediator", "work"},
	}
	// First qcryptd knows the chain it opened; after a restart only the qubes do.
	for _, restart := range []bool{false, true} {
		if restart {
			w.daemon.Process.Signal(syscall.SIGTERM)
			_ = w.daemon.Wait() // ended by a signal we sent; its status is not the point
			w.startDaemon()
		}
		for name, wrong := range wrongs {
			out, code := w.qcryptctl(append([]string{"close"}, wrong...)...)
			if code != 1 || !strings.Contains(out, "give the spec it was opened with") {
				t.Errorf("%s (restart %v): close exit %d %s", name, restart, code, out)
			}
			if out, code := w.qcryptctl(append([]string{"status"}, spec...)...); code != 0 {
				t.Fatalf("after the %s close (restart %v) the chain is not open: exit %d %s", name, restart, code, out)
			}
		}
	}
	run(0, "closed", append([]string{"close"}, spec...)...)
	if out := string(w.sh("work", "ls /dev/mapper").Stdout); out != "" {
		t.Errorf("left in work: %q", out)
	}
}

// TestCloseOfAnotherShape: a close whose container is open as another chain, given as a
// spec or as a configured chain's name, fails, names that chain and changes nothing; a
// close with nothing open says "not open", never "closed".
func TestCloseOfAnotherShape(t *testing.T) {
	t.Parallel()
	w := newWorld(t, "4.3", permissiveBus)
	w.writeChain("demo", demoChain)
	w.writeChain("mistyped", strings.Replace(demoChain, "destination vm 2=work", "destination vm 2=vault", 1))
	w.ctl("add-vm", "vault")
	w.startDaemon()
	c := w.client()
	if err := w.qubes.Start(bg, "work"); err != nil {
		t.Fatal(err)
	}
	w.waitState(c, "demo", "open", time.Minute)
	var transcript strings.Builder
	run := func(args ...string) {
		t.Helper()
		out, code := w.qcryptctl(args...)
		fmt.Fprintf(&transcript, "$ qcryptctl %s\n%s--- exit %d\n", strings.Join(args, " "), out, code)
	}
	run("close", "--", "sys-usb", "/home/user/demo.luks", "demo", "vault")
	run("close", "--force", "mistyped")
	if ci, err := c.Chain(bg, "demo"); err != nil || ci.State != "open" {
		t.Fatalf("the refused closes touched demo: %+v %v", ci, err)
	}
	if out, code := w.qcryptctl("status", "demo"); code != 0 {
		t.Fatalf("the refused closes touched demo: exit %d %s", code, out)
	}
	run("close", "demo")
	run("close", "demo")
	run("close", "--", "sys-usb", "/home/user/demo.luks", "demo", "vault")
	testkit.Golden(t, "testdata/golden/close-another-shape.txt", transcript.String())
}

// TestHeldClose: a chain qcryptd opened itself closes with one qrexec call per qube. A
// device removed from one of its qubes breaks that record: the next close reads the
// chain first. After an event gap, the reconcile that finds the chain open holds it
// again.
func TestHeldClose(t *testing.T) {
	t.Parallel()
	w := newWorld(t, "4.3", permissiveBus)
	w.writeChain("demo", demoChain)
	w.startDaemon()
	c := w.client()
	if err := w.qubes.Start(bg, "work"); err != nil {
		t.Fatal(err)
	}
	w.waitState(c, "demo", "open", time.Minute)
	closeCalls := func(when string) int {
		t.Helper()
		c0 := w.calls()
		if out, code := w.qcryptctl("close", "demo"); code != 0 {
			t.Fatalf("close %s: exit %d %s", when, code, out)
		}
		n := w.calls()["qrexec"] - c0["qrexec"]
		if out := w.sh("mediator", "ls /dev/mapper").Stdout; len(out) != 0 {
			t.Errorf("close %s left mediator with %q", when, out)
		}
		return n
	}
	open := func() {
		t.Helper()
		if out, code := w.qcryptctl("open", "demo"); code != 0 {
			t.Fatalf("open: exit %d %s", code, out)
		}
	}
	if n := closeCalls("after qcryptd's own open"); n != 3 {
		t.Errorf("close after qcryptd's own open: %d qrexec calls, want 3", n)
	}

	open()
	img := filepath.Join(w.dir, "other.img")
	if err := memkernel.MakeDiskImage(img, 4<<20, "OTHER", nil); err != nil {
		t.Fatal(err)
	}
	port := strings.TrimSpace(w.ctl("plug", "sys-usb", img))
	w.ctl("unplug", "sys-usb", port)
	testkit.Eventually(w.t, "qcryptd saw the device go", time.Minute, func() bool {
		return strings.Contains(w.log(), `vm=sys-usb level=debug msg="record broken`)
	})
	if n := closeCalls("after a device of sys-usb went away"); n != 6 {
		t.Errorf("close after the record broke: %d qrexec calls, want 6 (3 to read, 3 to close)", n)
	}

	open()
	jobs, err := c.Jobs(bg)
	if err != nil {
		t.Fatal(err)
	}
	last := slices.MaxFunc(jobs, func(a, b dbusapi.JobInfo) int { return cmp.Compare(a.ID, b.ID) }).ID
	reconnected := w.expectReconnect(c)
	w.ctl("drop-events")
	reconnected(time.Minute)
	testkit.Eventually(w.t, "the chain reconciled", time.Minute, func() bool {
		jobs, err := c.Jobs(bg)
		return err == nil && slices.ContainsFunc(jobs, func(j dbusapi.JobInfo) bool {
			return j.ID > last && j.Operation == dbusapi.OpReconcile && j.Chain == "demo" && j.State == "done"
		})
	})
	if n := closeCalls("after the reconcile found it open"); n != 3 {
		t.Errorf("close after an event gap and a reconcile: %d qrexec calls, want 3", n)
	}
}

// TestCancelHungAutoOpen: qcryptd's own open hangs in work; `qcryptctl cancel` ends it
// at once (not after the qrexec timeout) and the open is rolled back.
func TestCancelHungAutoOpen(t *testing.T) {
	t.Parallel()
	w := newWorld(t, "4.3", permissiveBus)
	w.writeChain("demo", demoChain)
	w.startDaemon()
	c := w.client()
	w.waitState(c, "demo", "waiting", 30*time.Second)
	w.holdAutoOpenInWork()
	w.ctl("qrexec-fault", "work", "none") // the call in work still hangs; the rollback's will not
	if out, code := w.qcryptctl("cancel", "demo"); code != 0 || !strings.Contains(out, "(open of demo, started by uid 0)") {
		t.Fatalf("cancel: exit %d: %s", code, out)
	}
	ci := w.waitState(c, "demo", "closed", time.Minute)
	if !strings.Contains(ci.LastError, "canceled") {
		t.Errorf("last error %q", ci.LastError)
	}
	if out := w.sh("mediator", "ls /dev/mapper").Stdout; len(out) != 0 {
		t.Errorf("mediator still decrypts: %q", out)
	}
	if out, code := w.qcryptctl("cancel", "demo"); code != 1 || !strings.Contains(out, "no running or queued job") {
		t.Errorf("second cancel: exit %d: %s", code, out)
	}
}

// TestCrossMachineLockThroughQcryptctl: another machine's lock beside the container
// stops the automatic read-write open with a clear reason; the user breaks it with
// qcryptctl open --break-lock, and the close removes this machine's lock.
func TestCrossMachineLockThroughQcryptctl(t *testing.T) {
	t.Parallel()
	w := newWorld(t, "4.3", permissiveBus)
	const me, other = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"
	w.daemonArgs = []string{"--machine-id", me}
	w.writeChain("demo", demoChain)
	lockFile := "/home/user/demo.luks.qcrypt-lock"
	w.sh("sys-usb", "echo 'qcrypt-lock 1 machine="+other+" chain=demo time=1764800000' > "+lockFile)
	w.startDaemon()
	c := w.client()
	w.waitState(c, "demo", "waiting", 30*time.Second)
	if err := w.qubes.Start(bg, "work"); err != nil {
		t.Fatal(err)
	}
	ci := w.waitState(c, "demo", "failed", time.Minute)
	if !strings.Contains(ci.LastError, "locked by another machine: machine "+other+" (chain demo, since 2025-12-03 22:13 UTC)") {
		t.Errorf("last error %q", ci.LastError)
	}
	if out, code := w.qcryptctl("open", "demo"); code != 1 || !strings.Contains(out, "--break-lock") {
		t.Errorf("open: exit %d: %s", code, out)
	}
	if out, code := w.qcryptctl("open", "--break-lock", "demo"); code != 0 {
		t.Fatalf("open --break-lock: exit %d: %s", code, out)
	}
	if got := string(w.sh("sys-usb", "cat "+lockFile).Stdout); !strings.HasPrefix(got, "qcrypt-lock 1 machine="+me+" chain=demo ") {
		t.Errorf("lock after --break-lock: %q", got)
	}
	if !strings.Contains(w.log(), "breaking another machine's lock") {
		t.Error("breaking the lock was not logged")
	}
	if out, code := w.qcryptctl("close", "demo"); code != 0 {
		t.Fatalf("close: exit %d: %s", code, out)
	}
	if got := w.sh("sys-usb", "ls "+lockFile).ExitCode; got == 0 {
		t.Error("the close left this machine's lock")
	}
}
