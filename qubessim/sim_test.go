package qubessim_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim"
	"github.com/qcrypt/qcrypt/qubessim/control"
	"github.com/qcrypt/qcrypt/qubessim/memkernel"
	"github.com/qcrypt/qcrypt/qubessim/simtest"
)

func TestMain(m *testing.M) { simtest.Main(m) }

var ctx = context.Background()

func mustStart(t *testing.T, f *simtest.Fixture, vms ...string) {
	t.Helper()
	for _, vm := range vms {
		if err := f.Client.Start(ctx, vm); err != nil {
			t.Fatal(err)
		}
	}
}

func ok(t *testing.T, f *simtest.Fixture, vm, script string) string {
	t.Helper()
	r := f.Sh(t, vm, script)
	if r.ExitCode != 0 {
		t.Fatalf("in %s: %q exited %d: %s", vm, script, r.ExitCode, r.Stderr)
	}
	return string(r.Stdout)
}

const (
	keyPath = "/home/user/.qcrypt/keys/demo"
	openCmd = "cryptsetup open --key-file " + keyPath + " /dev/xvdi demo"
)

// openDemo opens the demo chain by hand: loop in sys-usb, two hops, mount in work.
func openDemo(t *testing.T, f *simtest.Fixture, ro bool) {
	t.Helper()
	mustStart(t, f, "mediator", "work")
	ok(t, f, "sys-usb", "losetup -f --show "+qubessim.DemoContainer)
	if err := f.Client.Attach(ctx, "mediator", qubes.DeviceRef{Backend: "sys-usb", Port: "loop0"}, ro); err != nil {
		t.Fatal(err)
	}
	ok(t, f, "mediator", openCmd)
	if err := f.Client.Attach(ctx, "work", qubes.DeviceRef{Backend: "mediator", Port: "dm-0"}, ro); err != nil {
		t.Fatal(err)
	}
	ok(t, f, "work", openCmd+" && mkdir -p /mnt/secure && mount /dev/mapper/demo /mnt/secure")
}

func closeDemo(t *testing.T, f *simtest.Fixture) {
	t.Helper()
	ok(t, f, "work", "umount /mnt/secure && cryptsetup close demo")
	if err := f.Client.Detach(ctx, "work", qubes.DeviceRef{Backend: "mediator", Port: "dm-0"}); err != nil {
		t.Fatal(err)
	}
	ok(t, f, "mediator", "cryptsetup close demo")
	if err := f.Client.Detach(ctx, "mediator", qubes.DeviceRef{Backend: "sys-usb", Port: "loop0"}); err != nil {
		t.Fatal(err)
	}
	ok(t, f, "sys-usb", "losetup -d /dev/loop0")
}

func TestChainDataPersistsAndStaysEncrypted(t *testing.T) {
	t.Parallel()
	for _, d := range []qubessim.Dialect{qubessim.R42, qubessim.R43} {
		t.Run(string(d), func(t *testing.T) {
			f := simtest.StartDemo(t, d)
			openDemo(t, f, false)
			marker := "qcrypt-marker-7f3a9c"
			ok(t, f, "work", "echo "+marker+" > /mnt/secure/note")
			closeDemo(t, f)

			usb, _ := f.VM("sys-usb")
			med, _ := f.VM("mediator")
			container, err := os.ReadFile(filepath.Join(usb.Root(), qubessim.DemoContainer))
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(container, []byte(marker)) {
				t.Fatal("the container file holds the plaintext marker")
			}
			if got := ok(t, f, "mediator", "ls /mnt; find /home /mnt /tmp /root -name note 2>/dev/null | head -1"); strings.Contains(got, "note") {
				t.Errorf("mediator sees the file: %q", got)
			}
			_ = med

			openDemo(t, f, false)
			if got := ok(t, f, "work", "cat /mnt/secure/note"); got != marker+"\n" {
				t.Errorf("after reopen: %q", got)
			}
		})
	}
}

func TestQubesAreIsolated(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R42)
	mustStart(t, f, "mediator")
	ok(t, f, "sys-usb", "mkdir -p /mnt/only-here /srv && echo x > /tmp/t && echo y > /srv/s")
	if got := ok(t, f, "mediator", "ls /mnt /tmp; ls /srv 2>&1 || true; cat "+qubessim.DemoContainer+" 2>&1 | head -c 40 || true"); strings.Contains(got, "only-here") || strings.Contains(got, "t\n") || strings.Contains(got, " s\n") || !strings.Contains(got, "No such file") {
		t.Errorf("mediator sees sys-usb's files: %q", got)
	}
	if got := ok(t, f, "mediator", "hostname"); got != "mediator\n" {
		t.Errorf("hostname %q", got)
	}
	// A reboot keeps /home and /rw, drops the rest, like a template-based qube.
	ok(t, f, "mediator", "echo keep > /home/user/k && echo drop > /root/d && mkdir /mnt/gone")
	if err := f.Client.Shutdown(ctx, "mediator", false, true); err != nil {
		t.Fatal(err)
	}
	mustStart(t, f, "mediator")
	if got := ok(t, f, "mediator", "cat /home/user/k; ls /root /mnt"); got != "keep\n/mnt:\n\n/root:\n" && got != "keep\n/mnt:\n/root:\n" {
		t.Errorf("after reboot: %q", got)
	}
}

func TestToolFailuresLikeTheRealOnes(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R42)
	ok(t, f, "sys-usb", "losetup -f --show "+qubessim.DemoContainer+" && echo wrong > /tmp/wrong")
	tests := map[string]struct {
		script string
		code   int
		stderr string
	}{
		"wrong key":            {"cryptsetup open --key-file /tmp/wrong /dev/loop0 x", 2, "No key available with this passphrase."},
		"missing device":       {"cryptsetup open --key-file /tmp/wrong /dev/loop7 x", 4, "does not exist"},
		"close inactive":       {"cryptsetup close nothing", 4, "Device nothing is not active."},
		"status inactive":      {"cryptsetup status nothing", 4, "inactive"},
		"not LUKS":             {"truncate -s 1M /tmp/plain && l=$(losetup -f --show /tmp/plain) && cryptsetup open --key-file /tmp/wrong $l y", 1, "not a valid LUKS device"},
		"unsupported option":   {"cryptsetup open --integrity hmac-sha256 /dev/loop0 x", 1, "not supported by the simulator: option --integrity"},
		"unsupported action":   {"cryptsetup luksAddKey /dev/loop0", 1, "not supported by the simulator"},
		"losetup missing file": {"losetup -f --show /nope", 1, "No such file or directory"},
		"mount no fs":          {"mkdir -p /mnt/m && mount /dev/loop0 /mnt/m", 32, "wrong fs type"},
		"mount no mount point": {"truncate -s 1M /tmp/p2 && l=$(losetup -f --show /tmp/p2) && mkfs.ext4 -q $l && mount $l /mnt/none", 32, "mount point does not exist"},
		"umount not mounted":   {"umount /mnt", 32, "not mounted"},
		"luksFormat asks":      {"truncate -s 1M /tmp/p3 && l=$(losetup -f --show /tmp/p3) && echo no | cryptsetup luksFormat $l /tmp/wrong", 1, "Operation aborted."},
		"findmnt nothing":      {"findmnt -S /dev/mapper/none", 1, ""},
		"symlink escape":       {"ln -s / /tmp/root && losetup -f /tmp/root/etc/passwd", 1, "symlink"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			r := f.Sh(t, "sys-usb", tc.script)
			if r.ExitCode != tc.code || !strings.Contains(string(r.Stderr), tc.stderr) {
				t.Errorf("exit %d stderr %q; want %d containing %q", r.ExitCode, r.Stderr, tc.code, tc.stderr)
			}
		})
	}
}

func TestReadOnlyChain(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R42)
	openDemo(t, f, true)
	r := f.Sh(t, "work", "echo x > /mnt/secure/new")
	if r.ExitCode == 0 || !strings.Contains(string(r.Stderr), "Read-only file system") {
		t.Errorf("write on a read-only chain: exit %d %q", r.ExitCode, r.Stderr)
	}
	if got := ok(t, f, "work", "findmnt -n -o OPTIONS /mnt/secure; blockdev --getro /dev/xvdi"); got != "ro\n1\n" {
		t.Errorf("got %q", got)
	}
	if err := f.Client.Attach(ctx, "work", qubes.DeviceRef{Backend: "sys-usb", Port: "loop0"}, false); err == nil {
		t.Error("a device attached elsewhere attached again")
	}
}

func TestBackendShutdownAndBug4784(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R42)
	openDemo(t, f, false)
	if err := f.Client.Kill(ctx, "mediator"); err != nil {
		t.Fatal(err)
	}
	// R4.2 still lists the dead hop in work; the inner layer gets I/O errors.
	atts, err := f.Client.Attached(ctx, "work")
	if err != nil || len(atts) != 1 {
		t.Fatalf("attached: %v %v", atts, err)
	}
	if r := f.Sh(t, "work", "umount /mnt/secure"); r.ExitCode == 0 {
		t.Error("write-back to a dead backend succeeded")
	}
	// Detaching from the dead peer wedges qubesd's device handling (Qubes #4784).
	if err := f.Client.Detach(ctx, "work", qubes.DeviceRef{Backend: "mediator", Port: "dm-0"}); !errors.Is(err, qubes.ErrEmptyResponse) {
		t.Fatalf("detach from dead peer: %v", err)
	}
	if _, err := f.Client.Available(ctx, "sys-usb"); !errors.Is(err, qubes.ErrEmptyResponse) {
		t.Errorf("qubesd should be wedged, got %v", err)
	}
	if _, err := f.Client.ListVMs(ctx); err != nil {
		t.Errorf("non-device calls still work: %v", err)
	}
}

func TestFrontendDevAllocation(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R43)
	mustStart(t, f, "work")
	ok(t, f, "sys-usb", "truncate -s 1M /tmp/a /tmp/b && losetup -f /tmp/a && losetup -f /tmp/b")
	for _, p := range []string{"loop0", "loop1"} {
		if err := f.Client.Attach(ctx, "work", qubes.DeviceRef{Backend: "sys-usb", Port: p}, false); err != nil {
			t.Fatal(err)
		}
	}
	atts, _ := f.Client.Attached(ctx, "work")
	if len(atts) != 2 || atts[0].FrontendDev != "xvdi" || atts[1].FrontendDev != "xvdj" {
		t.Errorf("got %+v", atts)
	}
}

func TestHostileDescriptionsAreSanitised(t *testing.T) {
	t.Parallel()
	hostile := "evil\n\x1b[31m\xc3\xa4 $(rm -rf /)'\"`x (LAB\x00EL)"
	// R4.2: every byte outside letters, digits and "()+,-.:=_/ " becomes '_'.
	// R4.3: non-ASCII bytes are dropped first; then serial = text before the first space
	// with '_' as spaces, name = the rest without its outer characters; the client shows
	// "serial (name)".
	want := map[qubessim.Dialect]string{
		qubessim.R42: "evil___31m__ _(rm -rf /)___x (LAB_EL)",
		qubessim.R43: "evil   31m ((rm -rf /)   x (LAB EL)",
	}
	for d, w := range want {
		t.Run(string(d), func(t *testing.T) {
			f := simtest.StartDemo(t, d)
			ok(t, f, "sys-usb", "losetup -f "+qubessim.DemoContainer)
			f.SetDescription(qubes.DeviceRef{Backend: "sys-usb", Port: "loop0"}, hostile)
			devs, err := f.Client.Available(ctx, "sys-usb")
			if err != nil {
				t.Fatal(err)
			}
			if len(devs) != 1 {
				t.Fatalf("got %+v", devs)
			}
			if devs[0].Description != w {
				t.Errorf("description %q, want %q", devs[0].Description, w)
			}
		})
	}
}

func TestFaults(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R42)
	f.AddFault(control.Fault{Method: "admin.vm.List", Empty: true, Count: 1})
	if _, err := f.Client.ListVMs(ctx); !errors.Is(err, qubes.ErrEmptyResponse) {
		t.Errorf("first call: %v", err)
	}
	if _, err := f.Client.ListVMs(ctx); err != nil {
		t.Errorf("second call: %v", err)
	}
	f.AddFault(control.Fault{Method: "admin.vm.Start", Dest: "work", Type: "QubesMemoryError", Msg: "out of memory"})
	if err := f.Client.Start(ctx, "work"); !errors.Is(err, qubes.ErrQubes) || !strings.Contains(err.Error(), "out of memory") {
		t.Errorf("start: %v", err)
	}
	if err := f.Client.Start(ctx, "mediator"); err != nil {
		t.Errorf("other dest affected: %v", err)
	}
	f.ClearFaults()
	f.AddFault(control.Fault{Method: "admin.vm.CurrentState", Delay: 2 * time.Second})
	c := qubes.NewClient(f.Socket())
	c.SetTimeout(100 * time.Millisecond)
	if _, err := c.CurrentState(ctx, "work"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("delayed call: %v", err)
	}
	f.SetQrexecFault("work", control.QrexecFault{StartFail: "no memory"})
	if err := f.Client.Start(ctx, "work"); err == nil {
		t.Error("start succeeded")
	}
	if st, _ := f.Client.CurrentState(ctx, "work"); st != qubes.StateHalted {
		t.Errorf("state after failed start: %s", st)
	}
}

func TestPlugDiskAndSourceMount(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R43)
	img := filepath.Join(t.TempDir(), "usb.img")
	if err := memkernel.MakeDiskImage(img, 4<<20, "MYDISK", map[string][]byte{"containers/c.luks": make([]byte, 1<<20)}); err != nil {
		t.Fatal(err)
	}
	port, err := f.Plug("sys-usb", img, "", false)
	if err != nil || port != "sda" {
		t.Fatalf("plug: %q %v", port, err)
	}
	devs, _ := f.Client.Available(ctx, "sys-usb")
	if len(devs) != 1 || devs[0].Description != "QEMU HARDDISK (MYDISK)" {
		t.Errorf("available: %+v", devs)
	}
	got := ok(t, f, "sys-usb", "mkdir -p /mnt/usb && mount /dev/disk/by-label/MYDISK /mnt/usb && losetup -f --show /mnt/usb/containers/c.luks && echo hi > /mnt/usb/x")
	if got != "/dev/loop0\n" {
		t.Errorf("got %q", got)
	}
	if err := f.Unplug("sys-usb", "sda"); err == nil {
		// A disk in use is still pulled, like a yanked stick; its mount is lost.
		if r := f.Sh(t, "sys-usb", "ls /mnt/usb"); strings.Contains(string(r.Stdout), "x") {
			t.Errorf("mount survived the unplug: %q", r.Stdout)
		}
	} else {
		t.Fatal(err)
	}
}

func TestKillLosesUnwrittenData(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R42)
	openDemo(t, f, false)
	ok(t, f, "work", "echo lost > /mnt/secure/f")
	if err := f.Client.Kill(ctx, "work"); err != nil {
		t.Fatal(err)
	}
	work, _ := f.VM("work")
	if _, err := os.Stat(filepath.Join(work.Root(), "mnt/secure/f")); err == nil {
		t.Error("plaintext left in the killed qube's tree")
	}
}

func TestPausedQubeDoesNotAnswer(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R42)
	if err := f.Client.Pause(ctx, "sys-usb"); err != nil {
		t.Fatal(err)
	}
	f.Runner.ConnectTimeout = 1
	_, err := f.Runner.Run(ctx, "sys-usb", "true", nil)
	var te *qubes.TransportError
	if !errors.As(err, &te) || te.Code != qubes.ExitQrexecProblem {
		t.Errorf("got %v", err)
	}
}

func BenchmarkSimulatorCalls(b *testing.B) {
	f := simtest.StartDemo(b, qubessim.R42)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := f.Client.CurrentState(ctx, "work"); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "calls/s")
}

func BenchmarkSimulatorQrexec(b *testing.B) {
	f := simtest.StartDemo(b, qubessim.R42)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if r, err := f.Runner.Run(ctx, "sys-usb", "true", nil); err != nil || r.ExitCode != 0 {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "runs/s")
}

// BenchmarkRealQubesdCalls is BenchmarkSimulatorCalls against the real qubesd 4.3.
func BenchmarkRealQubesdCalls(b *testing.B) {
	f := simtest.StartReal(b, qubessim.R43)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := f.Client.CurrentState(ctx, "work"); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "calls/s")
}

// BenchmarkRealQubesdQrexec is BenchmarkSimulatorQrexec behind the real qubesd 4.3 (each
// call waits on an event barrier first).
func BenchmarkRealQubesdQrexec(b *testing.B) {
	f := simtest.StartReal(b, qubessim.R43)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if r, err := f.Runner.Run(ctx, "sys-usb", "true", nil); err != nil || r.ExitCode != 0 {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "runs/s")
}

// A kernel fault fires once, at the first matching block operation of the qube: a hang
// holds the tool until Release, a failure fails it; WaitFault says what fired.
func TestKernelFaults(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R43)
	f.AddKernelFault(control.KernelFault{VM: "sys-usb", Op: "loop-setup", Fail: true})
	if res := f.Sh(t, "sys-usb", "losetup -f --show /home/user/demo.luks"); res.ExitCode == 0 {
		t.Errorf("loop-setup with a failure fault: %q", res.Stdout)
	}
	if what, err := f.WaitFault(time.Minute); err != nil || what != "loop-setup sys-usb" {
		t.Errorf("fired %q %v", what, err)
	}
	f.AddKernelFault(control.KernelFault{VM: "sys-usb", Op: "loop-setup", Hang: true})
	done := make(chan string, 1)
	go func() { done <- ok(t, f, "sys-usb", "losetup -f --show /home/user/demo.luks") }()
	if what, err := f.WaitFault(time.Minute); err != nil || what != "loop-setup sys-usb" {
		t.Fatalf("fired %q %v", what, err)
	}
	// Held before the kernel ran it: no loop device yet, and the tool has not returned.
	if out := ok(t, f, "sys-usb", "losetup -a"); out != "" {
		t.Errorf("the held loop-setup ran before the release: %q", out)
	}
	select {
	case out := <-done:
		t.Fatalf("the held losetup ended before the release: %q", out)
	default:
	}
	f.Release()
	if out := <-done; out != "/dev/loop0\n" {
		t.Errorf("released losetup: %q", out)
	}
}

// A start of a qube that is starting waits for that start, as qubesd's startup_lock
// makes it: it returns once the qube runs, not while it is still transient.
func TestStartWaitsForAStartUnderWay(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R43)
	f.World.StartDelay = 5 * time.Second
	first := make(chan error, 1)
	go func() { first <- f.Client.Start(ctx, "work") }()
	for {
		if st, _ := f.Client.CurrentState(ctx, "work"); st == qubes.StateTransient {
			break
		}
		select {
		case err := <-first:
			t.Fatalf("the first start ended (%v) before work was seen starting", err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	if err := f.Client.Start(ctx, "work"); err != nil {
		t.Fatalf("second start: %v", err)
	}
	if st, _ := f.Client.CurrentState(ctx, "work"); st != qubes.StateRunning {
		t.Errorf("after the second start returned: %s, want Running", st)
	}
	if err := <-first; err != nil {
		t.Errorf("first start: %v", err)
	}
}

// With the real qrexec, calls go through Qubes' qrexec-client, qrexec-daemon and
// qrexec-agent; the agent and daemon start and die with their qube, and a qube that
// dies during a call ends it as the real qrexec-client says (255).
func TestRealQrexec(t *testing.T) {
	t.Parallel()
	for _, d := range []qubessim.Dialect{qubessim.R42, qubessim.R43} {
		t.Run(string(d), func(t *testing.T) {
			f := simtest.StartRealQrexec(t, d)
			res, err := f.Runner.Run(ctx, "sys-usb", "hostname; [ -f /home/user/demo.luks ] || exit 9; exit 3", nil)
			if err != nil || res.ExitCode != 3 || string(res.Stdout) != "sys-usb\n" {
				t.Fatalf("call in sys-usb: %+v %v", res, err)
			}
			var te *qubes.TransportError
			if _, err := f.Runner.Run(ctx, "work", "true", nil); !errors.As(err, &te) || te.Code != qubes.ExitQrexecProblem {
				t.Errorf("call in a halted qube: %v, want 125", err)
			}
			for boot := 1; boot <= 2; boot++ {
				if err := f.Client.Start(ctx, "work"); err != nil {
					t.Fatal(err)
				}
				if res, err := f.Runner.Run(ctx, "work", "hostname", nil); err != nil || string(res.Stdout) != "work\n" {
					t.Fatalf("boot %d: call in work: %+v %v", boot, res, err)
				}
				work, _ := f.VM("work")
				errc := make(chan error, 1)
				go func() {
					_, err := f.Runner.Run(ctx, "work", "touch /tmp/running; sleep 60", nil)
					errc <- err
				}()
				for {
					if _, err := os.Stat(filepath.Join(work.Root(), "tmp", "running")); err == nil {
						break
					}
					select {
					case err := <-errc:
						t.Fatalf("boot %d: the call ended (%v) before it ran", boot, err)
					case <-time.After(10 * time.Millisecond):
					}
				}
				if err := f.Client.Kill(ctx, "work"); err != nil {
					t.Fatal(err)
				}
				if err := <-errc; !errors.As(err, &te) || te.Code != qubes.ExitQrexecLost {
					t.Errorf("boot %d: qube killed during a call: %v, want 255", boot, err)
				}
				if _, err := f.Runner.Run(ctx, "work", "true", nil); !errors.As(err, &te) || te.Code != qubes.ExitQrexecProblem {
					t.Errorf("boot %d: call after the kill: %v, want 125 (no daemon)", boot, err)
				}
			}
		})
	}
}
