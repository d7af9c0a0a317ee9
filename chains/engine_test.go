package chains

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim"
	"github.com/qcrypt/qcrypt/qubessim/memkernel"
	"github.com/qcrypt/qcrypt/qubessim/simtest"
	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

func TestMain(m *testing.M) { simtest.Main(m) }

var bg = context.Background()

func demoChain() *Chain {
	return &Chain{Name: "demo", SourceVM: "sys-usb", SourceFile: qubessim.DemoContainer, Key: "demo",
		Hops: []Hop{{VM: "mediator"}, {VM: "work"}}, MountPoint: "/mnt/secure", Type: "luks"}
}

type rig struct {
	*simtest.Fixture
	e *Engine
}

func newRig(t testing.TB, d qubessim.Dialect) *rig {
	t.Helper()
	f := simtest.StartDemo(t, d)
	return &rig{Fixture: f, e: &Engine{Qubes: f.Client, Runner: checkedRunner{f.Runner}, Journal: &Journal{Dir: t.TempDir()}}}
}

func (r *rig) start(t testing.TB, vms ...string) {
	t.Helper()
	for _, vm := range vms {
		if err := r.Client.Start(bg, vm); err != nil {
			t.Fatal(err)
		}
	}
}

func (r *rig) status(t testing.TB, c *Chain) *Status {
	t.Helper()
	st, err := r.e.Status(bg, c)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// leftovers lists every loop, mapper and attachment in the demo qubes.
func (r *rig) leftovers(t *testing.T) []string {
	t.Helper()
	var out []string
	vms, _ := r.Client.ListVMs(bg)
	for _, vm := range vms {
		if vm.State != qubes.StateRunning {
			continue
		}
		res := r.Sh(t, vm.Name, "losetup -a; ls /dev/mapper")
		for _, l := range strings.Fields(string(res.Stdout)) {
			out = append(out, vm.Name+":"+l)
		}
		atts, err := r.Client.Attached(bg, vm.Name)
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range atts {
			out = append(out, vm.Name+"<-"+a.DeviceRef.String())
		}
	}
	return out
}

func TestOpenWriteCloseReopen(t *testing.T) {
	t.Parallel()
	for _, d := range []qubessim.Dialect{qubessim.R42, qubessim.R43} {
		t.Run(string(d), func(t *testing.T) {
			r := newRig(t, d)
			r.start(t, "work")
			c := demoChain()
			c.ReadOnly = false
			var steps []string
			if err := r.e.Open(bg, c, OpenOptions{}, func(p Progress) { steps = append(steps, fmt.Sprintf("%d/%d", p.Step, p.Steps)) }); err != nil {
				t.Fatal(err)
			}
			if len(steps) == 0 || steps[len(steps)-1] != fmt.Sprintf("%d/%d", len(steps), len(steps)) {
				t.Errorf("progress %v", steps)
			}
			if st := r.status(t, c); !st.Open() {
				t.Fatalf("status after open: %+v", st)
			}
			marker := "marker-c0ffee-123"
			r.Sh(t, "work", "echo "+marker+" > /mnt/secure/m")
			if err := r.e.Open(bg, c, OpenOptions{}, nil); !errors.Is(err, ErrAlreadyOpen) {
				t.Errorf("re-open: %v", err)
			}
			if err := r.e.Close(bg, c, CloseOptions{}, Closing{}, nil); err != nil {
				t.Fatal(err)
			}
			if left := r.leftovers(t); len(left) != 0 {
				t.Errorf("left after close: %v", left)
			}
			st := r.status(t, c)
			if st.Missing != 2*len(c.Hops)+1+1 || !st.Closed() {
				t.Errorf("closed status %d %+v, want %d", st.Missing, st, 2*len(c.Hops)+2)
			}
			// Closing twice changes nothing and says so.
			if err := r.e.Close(bg, c, CloseOptions{}, Closing{}, nil); !errors.Is(err, ErrNotOpen) {
				t.Errorf("second close: %v, want %v", err, ErrNotOpen)
			}
			usb, _ := r.VM("sys-usb")
			data, _ := os.ReadFile(filepath.Join(usb.Root(), qubessim.DemoContainer))
			if bytes.Contains(data, []byte(marker)) {
				t.Error("plaintext in the container file")
			}
			if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
				t.Fatal(err)
			}
			if got := r.Sh(t, "work", "cat /mnt/secure/m").Stdout; string(got) != marker+"\n" {
				t.Errorf("after reopen: %q", got)
			}
		})
	}
}

func TestOpenRefusals(t *testing.T) {
	t.Parallel()
	tests := map[string]struct {
		setup func(t *testing.T, r *rig, c *Chain)
		want  string
	}{
		"target not running": {func(t *testing.T, r *rig, c *Chain) {}, "target qube work (autostart is off)"},
		"source not running": {func(t *testing.T, r *rig, c *Chain) {
			r.start(t, "work")
			if err := r.Client.Shutdown(bg, "sys-usb", false, true); err != nil {
				t.Fatal(err)
			}
		}, "source qube sys-usb"},
		"missing qube": {func(t *testing.T, r *rig, c *Chain) { c.Hops[1].VM = "nosuchvm" }, "qube nosuchvm does not exist"},
		"missing container": {func(t *testing.T, r *rig, c *Chain) {
			r.start(t, "work")
			c.SourceFile = "/home/user/nothing.luks"
		}, "the container file does not exist"},
		"missing key": {func(t *testing.T, r *rig, c *Chain) {
			r.start(t, "work")
			r.Sh(t, "work", "rm /home/user/.qcrypt/keys/demo")
		}, "the key is missing"},
		"wrong key": {func(t *testing.T, r *rig, c *Chain) {
			r.start(t, "work")
			r.Sh(t, "work", "echo wrong > /home/user/.qcrypt/keys/demo")
		}, "wrong key"},
		"paused target": {func(t *testing.T, r *rig, c *Chain) {
			r.start(t, "work")
			if err := r.Client.Pause(bg, "work"); err != nil {
				t.Fatal(err)
			}
		}, "is paused"},
		// The key is read before anything is done; a store that cannot be read (here:
		// no dom0) stops the open with nothing to undo.
		"key store unreadable": {func(t *testing.T, r *rig, c *Chain) {
			r.start(t, "work")
			c.Hops[0].Inject = "keystore://"
		}, "cannot reach the key store"},
		// The engine refuses the AdminVM by the class qubesd reports, whatever let the
		// chain through (validation refuses the name earlier).
		"dom0 as target":       {func(t *testing.T, r *rig, c *Chain) { c.Hops[1].VM = "dom0" }, "dom0 is never part of a chain: dom0"},
		"dom0 as intermediate": {func(t *testing.T, r *rig, c *Chain) { r.start(t, "work"); c.Hops[0].VM = "dom0" }, "dom0 is never part of a chain"},
		"dom0 as source":       {func(t *testing.T, r *rig, c *Chain) { r.start(t, "work"); c.SourceVM = "dom0" }, "dom0 is never part of a chain"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			r := newRig(t, qubessim.R42)
			c := demoChain()
			tc.setup(t, r, c)
			err := r.e.Open(bg, c, OpenOptions{}, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
			if left := r.leftovers(t); len(left) != 0 {
				t.Errorf("left behind: %v", left)
			}
		})
	}
}

func TestAutostartStartsSourceAndTarget(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R42)
	if err := r.Client.Shutdown(bg, "sys-usb", false, true); err != nil {
		t.Fatal(err)
	}
	c := demoChain()
	c.Autostart = true
	if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	if !r.status(t, c).Open() {
		t.Error("not open")
	}
}

func TestReadOnlyChain(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R43)
	r.start(t, "work")
	c := demoChain()
	c.ReadOnly = true
	if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	res := r.Sh(t, "work", "touch /mnt/secure/x")
	if res.ExitCode == 0 || !strings.Contains(string(res.Stderr), "Read-only") {
		t.Errorf("write on a read-only chain: %d %s", res.ExitCode, res.Stderr)
	}
	atts, _ := r.Client.Attached(bg, "mediator")
	if len(atts) != 1 || !atts[0].ReadOnly {
		t.Errorf("attachment not read-only: %+v", atts)
	}
}

func TestKeyInjection(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R42)
	r.start(t, "work")
	// The demo key of work, copied to dom0 and removed from work, comes back by injection.
	work, _ := r.VM("work")
	key, err := os.ReadFile(filepath.Join(work.Root(), "home/user/.qcrypt/keys/demo"))
	if err != nil {
		t.Fatal(err)
	}
	inj := filepath.Join(t.TempDir(), "work_demo")
	if err := os.WriteFile(inj, key, 0o600); err != nil {
		t.Fatal(err)
	}
	r.Sh(t, "work", "rm /home/user/.qcrypt/keys/demo")
	c := demoChain()
	c.Hops[1].Inject = inj
	if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	res, _ := r.Runner.Run(bg, "work", "stat -c %a /home/user/.qcrypt/keys/demo; cmp -s /home/user/.qcrypt/keys/demo - && echo same", bytes.NewReader(key))
	if string(res.Stdout) != "600\nsame\n" {
		t.Errorf("injected key: %q", res.Stdout)
	}
	// An existing key is never overwritten.
	r.e.Close(bg, c, CloseOptions{}, Closing{}, nil)
	if err := os.WriteFile(inj, []byte("other"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Fatalf("open with an existing key and a different injection: %v", err)
	}
}

func TestPartialChain(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R42)
	r.start(t, "work")
	c := demoChain()
	if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	// Someone unmounts and closes the inner layer by hand: partially open.
	r.Sh(t, "work", "umount /mnt/secure && cryptsetup close demo")
	st := r.status(t, c)
	if st.Open() || st.Closed() || st.Missing != 2 {
		t.Fatalf("partial status %+v", st)
	}
	if err := r.e.Open(bg, c, OpenOptions{}, nil); !errors.Is(err, ErrPartiallyOpen) {
		t.Fatalf("open of a partial chain: %v", err)
	}
	if err := r.e.Open(bg, c, OpenOptions{Force: true}, nil); err != nil {
		t.Fatalf("forced open: %v", err)
	}
	if !r.status(t, c).Open() {
		t.Error("not open after forced open")
	}
}

func TestCloseAfterIntermediateWentDown(t *testing.T) {
	t.Parallel()
	for _, d := range []qubessim.Dialect{qubessim.R42, qubessim.R43} {
		t.Run(string(d), func(t *testing.T) {
			r := newRig(t, d)
			r.start(t, "work")
			c := demoChain()
			if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
				t.Fatal(err)
			}
			if err := r.Client.Kill(bg, "mediator"); err != nil {
				t.Fatal(err)
			}
			// The plaintext mount cannot be written back (its device is dead): a clean close
			// fails at the first layer and never touches the dead peer.
			err := r.e.Close(bg, c, CloseOptions{}, Closing{}, nil)
			if err == nil {
				t.Fatal("close of a chain with a dead middle succeeded without force")
			}
			if _, err := r.Client.Available(bg, "sys-usb"); err != nil {
				t.Fatalf("qubesd wedged (detached from a dead peer?): %v", err)
			}
			// The target is never shut down without its own option...
			if err := r.e.Close(bg, c, CloseOptions{Force: true}, Closing{}, nil); err == nil {
				t.Fatal("forced close shut the target down or lost data silently")
			}
			if st, _ := r.Client.CurrentState(bg, "work"); st != qubes.StateRunning {
				t.Fatalf("target is %s", st)
			}
			// ...and with it, the close converges.
			if err := r.e.Close(bg, c, CloseOptions{Force: true, ShutdownTarget: true}, Closing{}, nil); err != nil {
				t.Fatal(err)
			}
			if _, err := r.Client.Available(bg, "sys-usb"); err != nil {
				t.Fatalf("qubesd wedged: %v", err)
			}
			if left := r.leftovers(t); len(left) != 0 {
				t.Errorf("left: %v", left)
			}
			st := r.status(t, c)
			// source loop gone (+1), mediator and work down (+4 each), mount missing (+1)
			if st.Missing != 1+4+4+1 {
				t.Errorf("status %d %+v", st.Missing, st)
			}
		})
	}
}

func TestStatusCounts(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R42)
	c := demoChain()
	// sys-usb running with the file, mediator and work halted.
	if got := r.status(t, c).Missing; got != 1+4+4+1 {
		t.Errorf("halted destinations: %d", got)
	}
	r.start(t, "mediator", "work")
	if got := r.status(t, c).Missing; got != 2*2+1+1 {
		t.Errorf("closed, all running: %d", got)
	}
	c.MountPoint = ""
	if got := r.status(t, c).Missing; got != 2*2+1 {
		t.Errorf("closed without mount point: %d", got)
	}
	r.Sh(t, "work", "rm /home/user/.qcrypt/keys/demo")
	if got := r.status(t, c).Missing; got != 2*2+1+1 {
		t.Errorf("missing key: %d", got)
	}
	c.SourceFile = "/nothing"
	if got := r.status(t, c).Missing; got != 2+2+3 {
		t.Errorf("missing file: %d", got)
	}
	if err := r.Client.Shutdown(bg, "sys-usb", false, true); err != nil {
		t.Fatal(err)
	}
	if got := r.status(t, c).Missing; got != 3+2+3 {
		t.Errorf("source down: %d", got)
	}
}

func TestStatusStrangeState(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R42)
	r.start(t, "work")
	c := demoChain()
	if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	r.Sh(t, "mediator", "mv /home/user/.qcrypt/keys/demo /tmp/")
	st := r.status(t, c)
	if st.Open() || !strings.Contains(st.Problem, "without its key") {
		t.Errorf("status %+v", st)
	}
}

// failing wraps the Admin API and the runner and fails exactly the n-th call.
type failing struct {
	Qubes
	Runner
	mu    sync.Mutex
	n     int
	calls int
	what  []string
}

func (f *failing) hit(what string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	f.what = append(f.what, what)
	if f.calls == f.n {
		return fmt.Errorf("injected failure at call %d (%s)", f.n, what)
	}
	return nil
}

func (f *failing) ListVMs(ctx context.Context) ([]qubes.VM, error) {
	if err := f.hit("ListVMs"); err != nil {
		return nil, err
	}
	return f.Qubes.ListVMs(ctx)
}
func (f *failing) Start(ctx context.Context, vm string) error {
	if err := f.hit("Start " + vm); err != nil {
		return err
	}
	return f.Qubes.Start(ctx, vm)
}
func (f *failing) DefaultUser(ctx context.Context, vm string) (string, error) {
	if err := f.hit("DefaultUser " + vm); err != nil {
		return "", err
	}
	return f.Qubes.DefaultUser(ctx, vm)
}
func (f *failing) Available(ctx context.Context, vm string) ([]qubes.BlockDevice, error) {
	if err := f.hit("Available " + vm); err != nil {
		return nil, err
	}
	return f.Qubes.Available(ctx, vm)
}
func (f *failing) Attached(ctx context.Context, vm string) ([]qubes.Attachment, error) {
	if err := f.hit("Attached " + vm); err != nil {
		return nil, err
	}
	return f.Qubes.Attached(ctx, vm)
}
func (f *failing) Attach(ctx context.Context, vm string, d qubes.DeviceRef, ro bool) error {
	if err := f.hit("Attach " + d.String() + " to " + vm); err != nil {
		return err
	}
	return f.Qubes.Attach(ctx, vm, d, ro)
}
func (f *failing) Run(ctx context.Context, vm, script string, in io.Reader) (qubes.Result, error) {
	if err := f.hit("qrexec " + vm); err != nil {
		return qubes.Result{}, &qubes.TransportError{VM: vm, Code: qubes.ExitQrexecProblem}
	}
	return f.Runner.Run(ctx, vm, script, in)
}

func TestRollbackAfterAFailureAtEveryCall(t *testing.T) {
	t.Parallel()
	// Count the calls of a clean open, then fail each of them in turn.
	r := newRig(t, qubessim.R42)
	counter := &failing{Qubes: r.Client, Runner: r.Runner}
	r.e.Qubes, r.e.Runner = counter, counter
	if err := r.e.Open(bg, demoChain(), OpenOptions{Autostart: true}, nil); err != nil {
		t.Fatal(err)
	}
	total := counter.calls
	t.Logf("a clean open makes %d calls: %v", total, counter.what)
	for n := 1; n <= total; n++ {
		t.Run(fmt.Sprintf("call %d %s", n, counter.what[n-1]), func(t *testing.T) {
			r := newRig(t, qubessim.R42)
			f := &failing{Qubes: r.Client, Runner: r.Runner, n: n}
			r.e.Qubes, r.e.Runner = f, f
			c := demoChain()
			if err := r.e.Open(bg, c, OpenOptions{Autostart: true}, nil); err == nil {
				t.Fatal("open succeeded despite the failure")
			}
			if left := r.leftovers(t); len(left) != 0 {
				t.Errorf("left behind: %v", left)
			}
			rec, err := r.e.Journal.Read("demo")
			if err != nil {
				t.Fatal(err)
			}
			if rec != nil && (!rec.Finished || rec.Error == "") {
				t.Errorf("journal %+v", rec)
			}
			// And the chain opens cleanly afterwards.
			r.e.Qubes, r.e.Runner = r.Client, r.Runner
			if err := r.e.Open(bg, c, OpenOptions{Autostart: true}, nil); err != nil {
				t.Errorf("open after rollback: %v", err)
			}
		})
	}
}

func TestCancelBetweenStepsRollsBack(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R42)
	r.start(t, "work")
	ctx, cancel := context.WithCancel(bg)
	err := r.e.Open(ctx, demoChain(), OpenOptions{}, func(p Progress) {
		if p.Step == 4 {
			cancel()
		}
	})
	if !errors.Is(err, ErrCanceled) && !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v", err)
	}
	if left := r.leftovers(t); len(left) != 0 {
		t.Errorf("left behind: %v", left)
	}
}

func TestSpoofedDeviceIsRefused(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R42)
	r.start(t, "work")
	// mediator lies about its dm device: qubesd relays the description the qube wrote.
	r.SetDescription(qubes.DeviceRef{Backend: "mediator", Port: "dm-0"}, "other-key")
	err := r.e.Open(bg, demoChain(), OpenOptions{}, nil)
	if !errors.Is(err, ErrSpoofed) {
		t.Fatalf("got %v", err)
	}
	if left := r.leftovers(t); len(left) != 0 {
		t.Errorf("left behind: %v", left)
	}
}

func TestPlans(t *testing.T) {
	t.Parallel()
	c := demoChain()
	c.Hops[0].Inject = "/root/keys/mediator_demo"
	c.ReadOnly = true
	testkit.Golden(t, "testdata/golden/plan-open.txt", PlanOpen(c, OpenOptions{}).String())
	testkit.Golden(t, "testdata/golden/plan-close.txt", PlanClose(c, CloseOptions{Force: true, Eject: true}).String())
}

// What a plan shows is what runs: the journal of an open and of a close holds the
// steps of PlanOpen and PlanClose (an open leaves out the start of a running qube).
func TestPlanIsWhatRuns(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R43)
	c := demoChain()
	c.ReadOnly = true
	oo := OpenOptions{Autostart: true, InjectKeys: map[string][]byte{"work": []byte("not used: work has its key")}}
	if err := r.e.Open(bg, c, oo, nil); err != nil {
		t.Fatal(err)
	}
	var want Plan
	for _, s := range PlanOpen(c, oo) {
		if s.Kind != "start" || s.VM != "sys-usb" { // sys-usb runs already
			want = append(want, s)
		}
	}
	ran := func() Plan {
		rec, err := r.e.Journal.Read(c.Name)
		if err != nil || rec == nil {
			t.Fatalf("journal: %v %v", rec, err)
		}
		var p Plan
		for _, s := range rec.Steps {
			p = append(p, s.Step)
		}
		return p
	}
	if got := ran(); got.String() != want.String() {
		t.Errorf("open ran:\n%s\nplan:\n%s", got, want)
	}
	co := CloseOptions{Force: true, ShutdownTarget: true, Eject: true}
	if err := r.e.Close(bg, c, co, Closing{}, nil); err != nil {
		t.Fatal(err)
	}
	if got, want := ran(), PlanClose(c, co); got.String() != want.String() {
		t.Errorf("close ran:\n%s\nplan:\n%s", got, want)
	}
}

// discover runs Discover and renders each chain found as a line.
func (r *rig) discover(t *testing.T, line func(Discovered) string) string {
	t.Helper()
	found, err := r.e.Discover(bg)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, d := range found {
		lines = append(lines, line(d))
	}
	return strings.Join(lines, "\n")
}

func TestDiscover(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R43)
	r.start(t, "work")
	c := demoChain()
	if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	// A second, unconfigured one-layer chain made by hand: sys-usb:/tmp/other -> vault.
	if _, err := r.AddVM("vault", "AppVM", "user"); err != nil {
		t.Fatal(err)
	}
	r.start(t, "vault")
	r.Sh(t, "sys-usb", "truncate -s 1M /tmp/other && losetup -f /tmp/other")
	if err := r.Client.Attach(bg, "vault", qubes.DeviceRef{Backend: "sys-usb", Port: "loop1"}, false); err != nil {
		t.Fatal(err)
	}
	got := r.discover(t, func(d Discovered) string {
		return fmt.Sprintf("%s key=%q file=%q managed=%v", d, d.Key, d.File, d.Matches(c))
	})
	want := `sys-usb:loop0 --> mediator:dm-0 --> work:xvdi (r/w) key="demo" file="/home/user/demo.luks" managed=true` + "\n" +
		`sys-usb:loop1 --> vault:xvdi (r/w) key="" file="/tmp/other" managed=false`
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}

func TestReconcile(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R42)
	r.start(t, "work")
	c := demoChain()
	closed := r.status(t, c)
	if d := Reconcile(nil, closed); d != DecideClosed {
		t.Errorf("closed: %v", d)
	}
	if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	open := r.status(t, c)
	unfinishedOpen := &Record{Chain: "demo", Op: "open"}
	if d := Reconcile(unfinishedOpen, open); d != DecideAdopt {
		t.Errorf("complete despite an unfinished record: %v", d)
	}
	r.Sh(t, "work", "umount /mnt/secure && cryptsetup close demo")
	partial := r.status(t, c)
	for _, tc := range []struct {
		rec  *Record
		want Decision
	}{
		{unfinishedOpen, DecideRollback},
		{&Record{Chain: "demo", Op: "close"}, DecideFinishClose},
		{&Record{Chain: "demo", Op: "open", Finished: true, Error: "cannot attach; rollback failed too"}, DecideRollback},
		{&Record{Chain: "demo", Op: "open", Finished: true}, DecideFinishClose}, // opened, broke since
		{&Record{Chain: "demo", Op: "close", Finished: true, Error: "cannot detach"}, DecideFinishClose},
		{&Record{Chain: "demo", Op: "close", Finished: true}, DecideDegraded}, // closed cleanly: not ours
		{nil, DecideDegraded},
	} {
		if d := Reconcile(tc.rec, partial); d != tc.want {
			t.Errorf("%+v: %v, want %v", tc.rec, d, tc.want)
		}
	}
}

func TestJournalRecordsSteps(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R42)
	r.start(t, "work")
	if err := r.e.Open(bg, demoChain(), OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	rec, err := r.e.Journal.Read("demo")
	if err != nil || rec == nil {
		t.Fatalf("%v %v", rec, err)
	}
	var states []string
	for _, s := range rec.Steps {
		states = append(states, s.Kind+":"+s.State)
	}
	if !rec.Finished || rec.Op != "open" || strings.Join(states, " ") != "start:done source:done attach:done decrypt:done attach:done decrypt:done" ||
		rec.Steps[1].Facts["loop"] != "loop0" || rec.Steps[3].Facts["dm"] != "dm-0" || rec.Steps[4].Facts["frontend_dev"] != "xvdi" {
		t.Errorf("record %+v: %v", rec, states)
	}
}

// Without a journal (state directory full, read-only or not a directory) an open is
// refused before it changes anything, and a close still closes.
func TestCloseWithoutJournal(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R43)
	r.start(t, "work")
	c := demoChain()
	if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	notADir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notADir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	r.e.Journal = &Journal{Dir: notADir}
	if err := r.e.Close(bg, c, CloseOptions{}, Closing{}, nil); err != nil {
		t.Fatalf("close without a journal: %v", err)
	}
	if st := r.status(t, c); !st.Closed() {
		t.Errorf("not closed: %+v", st)
	}
	err := r.e.Open(bg, c, OpenOptions{}, nil)
	if err == nil || !strings.Contains(err.Error(), "cannot write journal") {
		t.Errorf("open without a journal: %v", err)
	}
	if left := r.leftovers(t); len(left) != 0 {
		t.Errorf("the refused open left %v", left)
	}
}

// A chain is what it was opened as: a spec with another source, file or key, or only a
// part of it, is not that chain. Its close is refused and touches nothing; its status
// does not count another chain's layers as its own.
func TestCloseRefusesAnotherChain(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R43)
	r.start(t, "work")
	open := demoChain()
	if err := r.e.Open(bg, open, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	tests := map[string]func(c *Chain){
		"wrong source (starts in the middle)": func(c *Chain) { c.SourceVM, c.Hops = "mediator", c.Hops[1:] },
		"skips the middle qube":               func(c *Chain) { c.Hops = c.Hops[1:] },
		"wrong file":                          func(c *Chain) { c.SourceFile = "/home/user/other.luks" },
		"wrong key":                           func(c *Chain) { c.Key = "badkey" },
		"first part of the chain":             func(c *Chain) { c.Hops = c.Hops[:1] },
	}
	for name, change := range tests {
		t.Run(name, func(t *testing.T) {
			c := demoChain()
			c.MountPoint = ""
			change(c)
			st := r.status(t, c)
			if st.Open() || st.Other == "" || st.Missing == 0 {
				t.Errorf("status of the wrong spec: %+v", st)
			}
			err := r.e.Close(bg, c, CloseOptions{}, Closing{}, nil)
			if !errors.Is(err, ErrOtherChain) {
				t.Fatalf("close of the wrong spec: %v", err)
			}
			if st := r.status(t, open); !st.Open() {
				t.Fatalf("the open chain was touched: %+v", st)
			}
		})
	}
	if err := r.e.Close(bg, open, CloseOptions{}, Closing{}, nil); err != nil {
		t.Fatalf("close of the right spec: %v", err)
	}
	if left := r.leftovers(t); len(left) != 0 {
		t.Errorf("left: %v", left)
	}
}

// A close of a spec whose container is open as another chain (another target, or a
// chain that shares its beginning) is refused, names that chain and touches nothing,
// even with force; with nothing of it open anywhere it says so; a loop device no chain
// uses is its leftover and goes.
func TestCloseOfAnotherShape(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R43)
	if _, err := r.AddVM("vault", "AppVM", "user"); err != nil {
		t.Fatal(err)
	}
	r.start(t, "work")
	open := demoChain()
	if err := r.e.Open(bg, open, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	spec := func(hops ...string) *Chain {
		c := demoChain()
		c.Name, c.Hops, c.MountPoint = "mistyped", nil, ""
		for _, vm := range hops {
			c.Hops = append(c.Hops, Hop{VM: vm})
		}
		return c
	}
	tests := []struct {
		hops []string
		want string
	}{
		{[]string{"vault"}, "cannot close mistyped: /home/user/demo.luks in sys-usb is open as sys-usb > mediator > work, not as sys-usb > vault: close that one"},
		{[]string{"mediator", "vault"}, "cannot close mistyped: /home/user/demo.luks in sys-usb is open as sys-usb > mediator > work, not as sys-usb > mediator > vault: close that one"},
	}
	for _, vaultRuns := range []bool{false, true} {
		if vaultRuns {
			r.start(t, "vault")
		}
		for _, tc := range tests {
			ran := false
			err := r.e.Close(bg, spec(tc.hops...), CloseOptions{Force: true}, Closing{BeforeSteps: func(context.Context) { ran = true }}, nil)
			if !errors.Is(err, ErrOtherChain) || err == nil || err.Error() != tc.want {
				t.Errorf("vault running %v: close %v: %v\nwant: %s", vaultRuns, tc.hops, err, tc.want)
			}
			if ran {
				t.Errorf("vault running %v: the refused close of %v ran its pre close hook", vaultRuns, tc.hops)
			}
			if st := r.status(t, open); !st.Open() {
				t.Fatalf("vault running %v: close %v touched the open chain: %+v", vaultRuns, tc.hops, st)
			}
		}
	}
	if err := r.e.Close(bg, open, CloseOptions{}, Closing{}, nil); err != nil {
		t.Fatal(err)
	}
	ran := false
	if err := r.e.Close(bg, spec("vault"), CloseOptions{}, Closing{BeforeSteps: func(context.Context) { ran = true }}, nil); !errors.Is(err, ErrNotOpen) || ran {
		t.Errorf("close with nothing open: %v (pre close ran: %v), want %v", err, ran, ErrNotOpen)
	}
	// A loop device of the container that nothing has attached (an open interrupted
	// right after its first step) is the closing chain's to remove.
	r.Sh(t, "sys-usb", "losetup -f "+qubessim.DemoContainer)
	if err := r.e.Close(bg, spec("vault"), CloseOptions{}, Closing{}, nil); err != nil {
		t.Errorf("close of a leftover loop device: %v", err)
	}
	if left := r.leftovers(t); len(left) != 0 {
		t.Errorf("left: %v", left)
	}
}

// A held close (qcryptd's record continuous since the open) goes straight to one call
// per qube; when the chain is not where the journal recorded it, the held close stops
// before changing anything and reads the chain first, as an unheld close does.
func TestHeldClose(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R43)
	r.start(t, "work")
	c := demoChain()
	if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	q0 := r.Runner.Spawns()
	if err := r.e.Close(bg, c, CloseOptions{}, Closing{Held: true}, nil); err != nil {
		t.Fatal(err)
	}
	if n := r.Runner.Spawns() - q0; n != 3 {
		t.Errorf("a held close of 2 layers made %d qrexec calls, want 3 (one per qube)", n)
	}
	if left := r.leftovers(t); len(left) != 0 {
		t.Errorf("left after the held close: %v", left)
	}

	// The record says work got mediator's device as xvdi; the chain was since closed
	// and opened again by someone else (another journal), with a disk of sys-usb on
	// work's xvdi first, so that the chain's device is xvdj now.
	if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	other := &Engine{Qubes: r.e.Qubes, Runner: r.e.Runner, Journal: &Journal{Dir: t.TempDir()}}
	if err := other.Close(bg, c, CloseOptions{}, Closing{}, nil); err != nil {
		t.Fatal(err)
	}
	r.Sh(t, "sys-usb", "truncate -s 1M /tmp/disk && losetup -f /tmp/disk")
	if err := r.Client.Attach(bg, "work", qubes.DeviceRef{Backend: "sys-usb", Port: "loop0"}, false); err != nil {
		t.Fatal(err)
	}
	if err := other.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	ran := 0
	q0 = r.Runner.Spawns()
	if err := r.e.Close(bg, c, CloseOptions{}, Closing{Held: true, BeforeSteps: func(context.Context) { ran++ }}, nil); err != nil {
		t.Fatalf("held close of a chain not where recorded: %v", err)
	}
	if n := r.Runner.Spawns() - q0; n <= 3 {
		t.Errorf("the held close made %d qrexec calls: it did not read the chain after its record failed", n)
	}
	if ran != 1 {
		t.Errorf("the pre close hook ran %d times, want once", ran)
	}
	// Only the disk is left: its loop device in sys-usb, attached to work.
	if left := strings.Join(r.leftovers(t), " "); left != "sys-usb:/dev/loop0: sys-usb:[]: sys-usb:(/tmp/disk) work<-sys-usb:loop0" {
		t.Errorf("left: %s", left)
	}
	if st := r.status(t, c); !st.Closed() {
		t.Errorf("not closed: %+v", st)
	}
}

// The original's status --mp "": the plaintext counts as there when it is mounted,
// wherever; without a mount check its mount does not count at all.
func TestStatusMountedAnywhere(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R43)
	r.start(t, "work")
	if err := r.e.Open(bg, demoChain(), OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	anywhere, unchecked := demoChain(), demoChain()
	anywhere.MountPoint, anywhere.MountAnywhere = "", true
	unchecked.MountPoint = ""
	if st := r.status(t, anywhere); !st.Open() {
		t.Errorf("mounted on /mnt/secure, checked anywhere: %+v", st)
	}
	r.Sh(t, "work", "umount /mnt/secure")
	if st := r.status(t, anywhere); st.Missing != 1 {
		t.Errorf("not mounted, checked anywhere: %d missing, want 1", st.Missing)
	}
	if st := r.status(t, unchecked); !st.Open() {
		t.Errorf("not mounted, not checked: %+v", st)
	}
}

// killsOnRun kills a qube just before the first command in it: the qube stops while
// the engine reads it.
type killsOnRun struct {
	f    *simtest.Fixture
	vm   string
	done bool
}

func (k *killsOnRun) Run(ctx context.Context, vm, script string, in io.Reader) (qubes.Result, error) {
	if vm == k.vm && !k.done {
		k.done = true
		if err := k.f.Client.Kill(ctx, vm); err != nil {
			return qubes.Result{}, err
		}
	}
	return k.f.Runner.Run(ctx, vm, script, in)
}

// TestStatusOfAQubeThatStopsMeanwhile: a qube that shuts down while the status reads it
// is a qube that is not running, not an error (the real qubesd stops a qube at once).
func TestStatusOfAQubeThatStopsMeanwhile(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R43)
	c := demoChain()
	if err := r.e.Open(bg, c, OpenOptions{Autostart: true}, nil); err != nil {
		t.Fatal(err)
	}
	k := &killsOnRun{f: r.Fixture, vm: "work"}
	r.e.Runner = k
	st, err := r.e.Status(bg, c)
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	if !k.done || st.Hops[1].Running || st.Open() {
		t.Errorf("status after work stopped: %+v (killed %v)", st, k.done)
	}
}

// After a middle qube dies, the next qube keeps a device whose backend is gone (Qubes
// #4784: detaching it wedges qubesd). An open is refused, even forced, naming the qube
// to restart; qubesd still answers.
func TestOpenRefusedOverADeadBackend(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R43)
	r.start(t, "work")
	c := demoChain()
	if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.Client.Kill(bg, "mediator"); err != nil {
		t.Fatal(err)
	}
	for _, force := range []bool{false, true} {
		err := r.e.Open(bg, c, OpenOptions{Force: force}, nil)
		if !errors.Is(err, ErrStaleDevice) || !strings.Contains(err.Error(), "restart work") {
			t.Errorf("open (force %v) over a dead mediator: %v", force, err)
		}
	}
	if st, _ := r.Client.CurrentState(bg, "mediator"); st != "Halted" {
		t.Errorf("the refused open changed mediator: %s", st)
	}
	atts, err := r.Client.Attached(bg, "work")
	if err != nil || len(atts) != 1 {
		t.Errorf("qubesd after the refused open: %v %v", atts, err)
	}
}

// A qube has a bounded number of block device slots (R4.2: xvdi-xvdz, xvde-xvdh): an
// open that needs one more is refused with that reason before it changes anything (from
// the listing the open makes anyway). R4.3 goes on with xvdaa.
func TestOpenRefusedWithoutAFrontendSlot(t *testing.T) {
	t.Parallel()
	for _, d := range []qubessim.Dialect{qubessim.R42, qubessim.R43} {
		t.Run(string(d), func(t *testing.T) {
			r := newRig(t, d)
			r.start(t, "work")
			for i := 0; i < 22; i++ {
				port := fmt.Sprintf("sdx%d", i)
				if err := r.Expose("sys-usb", port, 1<<20, false, "filler", ""); err != nil {
					t.Fatal(err)
				}
				if err := r.Client.Attach(bg, "work", qubes.DeviceRef{Backend: "sys-usb", Port: port}, false); err != nil {
					t.Fatalf("attach %d: %v", i, err)
				}
			}
			c := demoChain()
			err := r.e.Open(bg, c, OpenOptions{}, nil)
			if d == qubessim.R43 {
				if err != nil {
					t.Fatalf("open with 22 devices attached to work: %v", err)
				}
				atts, _ := r.Client.Attached(bg, "work")
				for _, a := range atts {
					if a.Backend == "mediator" && a.FrontendDev != "xvdae" {
						t.Errorf("the chain's device in work is %s, want xvdae", a.FrontendDev)
					}
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), "work has no free block device slot (22 devices attached)") {
				t.Fatalf("open: %v", err)
			}
			if st := r.status(t, c); !st.Closed() {
				t.Errorf("the refused open left %+v", st)
			}
			if st, _ := r.Client.CurrentState(bg, "mediator"); st != "Halted" {
				t.Errorf("the refused open started mediator: %s", st)
			}
		})
	}
}

// The cross-machine lock: a read-write open writes it and the close removes it; another
// machine's lock refuses a read-write open before anything changes, is shown only when
// it is a lock line, lets a read-only open go on and is replaced by --break-lock.
func TestCrossMachineLock(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R43)
	r.start(t, "work")
	const me, other = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"
	r.e.MachineID = me
	lockFile := qubessim.DemoContainer + ".qcrypt-lock"
	readLock := func() string {
		return string(r.Sh(t, "sys-usb", "cat "+lockFile+" 2>/dev/null").Stdout)
	}
	c := demoChain()
	if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	if got := readLock(); !strings.HasPrefix(got, "qcrypt-lock 1 machine="+me+" chain=demo time=") {
		t.Errorf("lock after a read-write open: %q", got)
	}
	if err := r.e.Close(bg, c, CloseOptions{}, Closing{}, nil); err != nil {
		t.Fatal(err)
	}
	if got := readLock(); got != "" {
		t.Errorf("lock after the close: %q", got)
	}

	tests := []struct {
		name, lock, want string
	}{
		{"another machine", "qcrypt-lock 1 machine=" + other + " chain=vault time=1764800000", "machine " + other + " (chain vault, since 2025-12-03 22:13 UTC)"},
		{"hostile", "qcrypt-lock 1 machine=\x1b[2J" + other + " chain=x time=1", "a lock file qcrypt cannot read"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r.Sh(t, "sys-usb", "printf '%s\\n' "+q(tc.lock)+" > "+lockFile)
			err := r.e.Open(bg, c, OpenOptions{}, nil)
			if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\x1b") {
				t.Fatalf("read-write open: %v", err)
			}
			if st := r.status(t, c); !st.Closed() {
				t.Errorf("the refused open left %+v", st)
			}
			ro := demoChain()
			ro.ReadOnly = true
			if err := r.e.Open(bg, ro, OpenOptions{}, nil); err != nil {
				t.Fatalf("read-only open: %v", err)
			}
			if err := r.e.Close(bg, ro, CloseOptions{}, Closing{}, nil); err != nil {
				t.Fatal(err)
			}
			if got := readLock(); got != tc.lock+"\n" {
				t.Errorf("the read-only open changed the lock: %q", got)
			}
			if err := r.e.Open(bg, c, OpenOptions{BreakLock: true}, nil); err != nil {
				t.Fatalf("open with --break-lock: %v", err)
			}
			if got := readLock(); !strings.Contains(got, "machine="+me) {
				t.Errorf("lock after breaking it: %q", got)
			}
			if err := r.e.Close(bg, c, CloseOptions{}, Closing{}, nil); err != nil {
				t.Fatal(err)
			}
		})
	}
	// This machine's own lock, left by a crash, is no obstacle.
	r.Sh(t, "sys-usb", "echo 'qcrypt-lock 1 machine="+me+" chain=demo time=1' > "+lockFile)
	if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
		t.Errorf("open over this machine's stale lock: %v", err)
	}
}

// An open refused after the source script mounted the source device (here: another
// machine's lock beside the container on a USB disk) unmounts it again.
func TestRefusedOpenUnmountsTheSourceDevice(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R43)
	r.start(t, "work")
	r.e.MachineID = "0123456789abcdef0123456789abcdef"
	container, err := os.ReadFile(filepath.Join(filepath.Dir(r.Socket()), "qubes/sys-usb/home/user/demo.luks"))
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(t.TempDir(), "usb.img")
	lock := []byte("qcrypt-lock 1 machine=fedcba9876543210fedcba9876543210 chain=demo time=1\n")
	if err := memkernel.MakeDiskImage(img, 16<<20, "QCRYPTUSB", map[string][]byte{"c/demo.luks": container, "c/demo.luks.qcrypt-lock": lock}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Plug("sys-usb", img, "", false); err != nil {
		t.Fatal(err)
	}
	c := demoChain()
	c.SourceDevice, c.SourceMountPoint, c.SourceFile = "/dev/disk/by-label/QCRYPTUSB", "/mnt/usb", "/c/demo.luks"
	if err := r.e.Open(bg, c, OpenOptions{}, nil); !errors.Is(err, ErrLocked) {
		t.Fatalf("open: %v", err)
	}
	if res := r.Sh(t, "sys-usb", "findmnt -n /mnt/usb"); res.ExitCode == 0 {
		t.Errorf("the source device stayed mounted: %q", res.Stdout)
	}
}

// Many chains through the same qubes are read together: one qube listing, one
// attachment listing per running destination, one device listing per backend, one
// script per running qube; each chain's status is what it is read alone.
func TestStatusOfManyChainsTogether(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R43)
	r.start(t, "mediator", "work")
	var cs []*Chain
	for i := range 6 {
		c := demoChain()
		c.Name, c.Key = fmt.Sprintf("c%d", i), fmt.Sprintf("k%d", i)
		c.SourceFile = fmt.Sprintf("/home/user/c%d.luks", i)
		c.MountPoint = fmt.Sprintf("/mnt/c%d", i)
		r.Sh(t, "sys-usb", "cp "+qubessim.DemoContainer+" "+c.SourceFile)
		for _, vm := range []string{"mediator", "work"} {
			r.Sh(t, vm, fmt.Sprintf("cp /home/user/.qcrypt/keys/demo /home/user/.qcrypt/keys/k%d", i))
		}
		cs = append(cs, c)
	}
	for _, c := range cs[:3] {
		if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
			t.Fatal(err)
		}
	}
	r.Sh(t, "work", "umount /mnt/c1") // c1 decrypted but not mounted
	alone := map[*Chain]*Status{}
	for _, c := range cs {
		alone[c] = r.status(t, c)
	}
	if !alone[cs[0]].Open() || alone[cs[1]].Missing != 1 || !alone[cs[4]].Closed() {
		t.Fatalf("statuses read alone: %+v %+v %+v", alone[cs[0]], alone[cs[1]], alone[cs[4]])
	}

	// A chain that cannot be read fails alone.
	bad := demoChain()
	bad.Name, bad.Hops = "bad", []Hop{{VM: "dom0"}}
	admin0, spawns0 := r.Client.Calls(), r.Runner.Spawns()
	together := r.e.statusAll(bg, append(cs, bad))
	if err := together[bad].err; !errors.Is(err, ErrAdminVM) {
		t.Errorf("chain through dom0: %v", err)
	}
	if admin, spawns := r.Client.Calls()-admin0, r.Runner.Spawns()-spawns0; admin != 5 || spawns != 3 {
		t.Errorf("read together with %d Admin API calls and %d scripts, want 5 (list, attached ×2, available ×2) and 3 (one per qube)", admin, spawns)
	}
	for _, c := range cs {
		got := together[c]
		if got.err != nil {
			t.Fatalf("%s: %v", c.Name, got.err)
		}
		if fmt.Sprintf("%+v", got.st) != fmt.Sprintf("%+v", alone[c]) {
			t.Errorf("%s read together: %+v\nread alone: %+v", c.Name, got.st, alone[c])
		}
	}
}

// A qube's answer to a status read is parsed strictly: any line out of place fails it.
func TestParseStatusAnswers(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		out  string
		n    int
		want []pieceAnswer
	}{
		{"0 40\n1 41\n", 2, []pieceAnswer{{code: 40}, {code: 41}}},
		{"0 40\n1 41", 2, []pieceAnswer{{code: 40}, {code: 41}}},
		{"0 40 crypt/capi:xts(aes)-plain64/512\n1 41 crypt/aes-xts-plain64/256 linear//0\n", 2, []pieceAnswer{
			{code: 40, segments: []Segment{{"crypt", "aes-xts-plain64", 512}}},
			{code: 41, segments: []Segment{{"crypt", "aes-xts-plain64", 256}, {Target: "linear"}}}}},
		{"0 40 crypt/aes xts/512\n", 1, nil},     // a word that is no segment
		{"0 40 crypt/aes-xts-plain64\n", 1, nil}, // no key size
		{"", 0, nil},
		{"0 40\n", 2, nil},             // an answer missing
		{"0 40\n1 41\n2 42\n", 2, nil}, // one too many
		{"1 41\n0 40\n", 2, nil},       // out of order
		{"0 40\n0 41\n", 2, nil},       // twice
		{"0 40\nx\n1 41\n", 2, nil},    // noise
		{"0 40 \n1 41\n", 2, nil},      // trailing space
		{"0 4000\n1 41\n", 2, nil},     // no exit code
		{"0 -1\n1 41\n", 2, nil},       // negative
		{"0 40\n\n1 41\n", 2, nil},     // empty line
		{"0 40\n1 41\n\n", 2, nil},     // two trailing newlines
		{"00 40\n1 41\n", 2, nil},      // not the index as written
	} {
		got, err := parseStatusAnswers([]byte(tc.out), tc.n)
		if tc.want == nil && tc.n > 0 {
			if err == nil {
				t.Errorf("%q: accepted as %v", tc.out, got)
			}
			continue
		}
		if err != nil || fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%q: %v %v, want %v", tc.out, got, err, tc.want)
		}
	}
}

// lateAttach is qubesd as it is when its client hangs up during an attach: the attach
// is still carried out. The user's cancel comes while the attach to the target is under
// way; an attach given up by the engine lands after the rollback's detach of it, the
// worst moment (the layer below is still open).
type lateAttach struct {
	Qubes
	cancel func()
	mu     sync.Mutex
	late   func()
}

func (l *lateAttach) Attach(ctx context.Context, vm string, d qubes.DeviceRef, ro bool) error {
	if vm != "work" {
		return l.Qubes.Attach(ctx, vm, d, ro)
	}
	l.cancel()
	if err := ctx.Err(); err != nil {
		l.mu.Lock()
		l.late = func() { _ = l.Qubes.Attach(bg, vm, d, ro) }
		l.mu.Unlock()
		return err
	}
	return l.Qubes.Attach(ctx, vm, d, ro)
}

func (l *lateAttach) Detach(ctx context.Context, vm string, d qubes.DeviceRef) error {
	err := l.Qubes.Detach(ctx, vm, d)
	l.mu.Lock()
	late := l.late
	l.late = nil
	l.mu.Unlock()
	if late != nil {
		late()
	}
	return err
}

// A cancel during an attach ends the open after qubesd answered it, so the rollback
// detaches what was attached and nothing is left (it was: the device attached, the
// layer below busy, "rollback ... failed too").
func TestCancelDuringAttachRollsBackAll(t *testing.T) {
	t.Parallel()
	r := newRig(t, qubessim.R43)
	r.start(t, "work")
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	r.e.Qubes = &lateAttach{Qubes: r.Client, cancel: cancel}
	err := r.e.Open(ctx, demoChain(), OpenOptions{Autostart: true}, nil)
	if !errors.Is(err, ErrCanceled) && !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v", err)
	}
	if strings.Contains(err.Error(), "failed too") {
		t.Errorf("the rollback failed: %v", err)
	}
	if left := r.leftovers(t); len(left) != 0 {
		t.Errorf("left behind: %v", left)
	}
}
