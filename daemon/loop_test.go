package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim"
	"github.com/qcrypt/qcrypt/qubessim/control"
	"github.com/qcrypt/qcrypt/qubessim/simtest"
	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

// In-process tests of the event loop (under -race), with the simulator and a recording
// publisher instead of the bus.

func TestMain(m *testing.M) { simtest.Main(m) }

// recorder is the publisher of the loop tests. It holds every state change against the
// state machine (docs/states.md), so each test also checks that.
type recorder struct {
	t       testing.TB
	mu      sync.Mutex
	states  map[string][]dbusapi.ChainState
	reasons map[string][]dbusapi.Reason // the reason of each state in states
	jobs    map[uint64]bool
}

func (r *recorder) ChainAdded(c dbusapi.ChainInfo) { r.ChainChanged(c, "", dbusapi.Reason{}) }
func (r *recorder) ChainChanged(c dbusapi.ChainInfo, prev dbusapi.ChainState, why dbusapi.Reason) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if prev != "" && !allowedTransition(prev, c.State) {
		r.t.Errorf("chain %s: %s -> %s (%s: %s) is not in the state machine", c.Name, prev, c.State, why.Cause, why.Text)
	}
	if prev != "" && why.Cause == "" {
		r.t.Errorf("chain %s: %s -> %s (%q) has no cause", c.Name, prev, c.State, why.Text)
	}
	if l := r.states[c.Name]; len(l) == 0 || l[len(l)-1] != c.State {
		r.states[c.Name] = append(r.states[c.Name], c.State)
		r.reasons[c.Name] = append(r.reasons[c.Name], why)
	}
}
func (r *recorder) ChainRemoved(string)        {}
func (r *recorder) JobAdded(dbusapi.JobInfo)   {}
func (r *recorder) JobChanged(dbusapi.JobInfo) {}
func (r *recorder) JobCompleted(j dbusapi.JobInfo, ok bool) {
	r.mu.Lock()
	r.jobs[j.ID] = ok
	r.mu.Unlock()
}
func (r *recorder) JobRemoved(uint64)     {}
func (r *recorder) SummaryChanged(string) {}

// times counts how often the chain entered state.
func (r *recorder) times(name string, state dbusapi.ChainState) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, s := range r.states[name] {
		if s == state {
			n++
		}
	}
	return n
}

func (r *recorder) last(name string) dbusapi.ChainState {
	r.mu.Lock()
	defer r.mu.Unlock()
	l := r.states[name]
	if len(l) == 0 {
		return ""
	}
	return l[len(l)-1]
}

var loopDemoChain = qubessim.DemoChain("startup interval=0")

// held is a simulated qubesd call stopped where a test wants it.
type held struct{ reached, hold chan struct{} }

// holding makes fault stop its call until release; it returns the fault to add.
func holding(fault control.Fault) (control.Fault, *held) {
	h := &held{reached: make(chan struct{}, 1), hold: make(chan struct{})}
	fault.Reached, fault.Hold = func() { h.reached <- struct{}{} }, h.hold
	return fault, h
}

// wait waits until the call is there.
func (h *held) wait(t *testing.T, what string) {
	t.Helper()
	select {
	case <-h.reached:
	case <-time.After(time.Minute):
		t.Fatalf("%s: the call was never made", what)
	}
}

// release lets the call be answered.
func (h *held) release() { close(h.hold) }

// startLoop runs the loop on the demo world; before runs first (faults, delays).
func startLoop(t *testing.T, before ...func(*simtest.Fixture)) (*simtest.Fixture, *Daemon, *recorder) {
	t.Helper()
	return startLoopWith(t, map[string]string{"demo": loopDemoChain}, before...)
}

// startLoopWith runs the loop with the given chain files (name -> content).
func startLoopWith(t *testing.T, files map[string]string, before ...func(*simtest.Fixture)) (*simtest.Fixture, *Daemon, *recorder) {
	t.Helper()
	f := simtest.StartDemo(t, qubessim.R43)
	for _, b := range before {
		b(f)
	}
	d, rec, _ := runLoop(t, f, writeConf(t, files), t.TempDir())
	return f, d, rec
}

// writeConf writes chain files (name -> content) as the target demo of a new config root.
func writeConf(t *testing.T, files map[string]string) string {
	t.Helper()
	conf := t.TempDir()
	if err := os.MkdirAll(filepath.Join(conf, "demo"), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(conf, "demo", name+".ini"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return conf
}

// runLoop runs a daemon on a world, a config root and a state dir; stop ends it (also
// done at the test's end).
func runLoop(t *testing.T, f *simtest.Fixture, conf, state string) (*Daemon, *recorder, func()) {
	t.Helper()
	return runLoopWith(t, Options{ConfigRoot: conf, StateDir: state, Qubes: f.Client, Runner: f.Runner})
}

// runLoopWith runs a daemon with o (target demo, quick backoff added) and a recorder.
func runLoopWith(t *testing.T, o Options) (*Daemon, *recorder, func()) {
	t.Helper()
	o.Target, o.JobLinger = "demo", time.Millisecond
	o.Backoff = qubes.Backoff{Min: 10 * time.Millisecond, Max: 50 * time.Millisecond}
	d, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	rec := &recorder{t: t, states: map[string][]dbusapi.ChainState{}, reasons: map[string][]dbusapi.Reason{}, jobs: map[uint64]bool{}}
	d.SetPublisher(rec)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		if err := d.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("run: %v", err)
		}
		close(done)
	}()
	var once sync.Once
	stop := func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	return d, rec, stop
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	testkit.Eventually(t, what, 30*time.Second, ok)
}

func TestLoopOpensOnStartAndClosesOnShutdown(t *testing.T) {
	f, d, rec := startLoop(t)
	waitFor(t, "waiting", func() bool { return rec.last("demo") == dbusapi.ChainWaiting })
	if err := f.Client.Start(context.Background(), "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
	// The event stream drops: the loop resyncs and adopts the open chain.
	f.DropEventStreams()
	waitFor(t, "resync", func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return len(rec.jobs) >= 3 // reconcile, open, reconcile
	})
	if rec.last("demo") != dbusapi.ChainOpen {
		t.Errorf("after resync: %v", rec.states["demo"])
	}
	if err := f.Client.Kill(context.Background(), "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "closed again", func() bool { return rec.last("demo") == dbusapi.ChainWaiting })
	ids := d.ListChains()
	if len(ids) != 1 || ids[0].Name != "demo" {
		t.Errorf("chains %+v", ids)
	}
}

// A qube that finishes starting while the loop's resync lists the qubes: the listing,
// taken while work was still starting, must not undo the domain-start event that came
// after it (the chain then waited for a running qube: found as a flaky
// TestLoopConcurrentRequests, which starts work while the loop connects).
func TestLoopQubeStartsDuringResync(t *testing.T) {
	// The resync lists the qubes first, then probes the device API: held there, the
	// listing (work halted) is taken and its answer not yet used.
	fault, probe := holding(control.Fault{Method: "admin.vm.device.block.Attached", Dest: "dom0", Count: 1})
	f, _, rec := startLoop(t, func(f *simtest.Fixture) { f.AddFault(fault) })
	probe.wait(t, "the resync's device API probe")
	if err := f.Client.Start(context.Background(), "work"); err != nil {
		t.Fatal(err)
	}
	probe.release()
	waitFor(t, "open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
}

func TestLoopConcurrentRequests(t *testing.T) {
	f, d, rec := startLoop(t)
	if err := f.Client.Start(context.Background(), "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
	var wg sync.WaitGroup
	for i := 0; i < 40; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			// Half of them are refused (another job is under way): what counts is the end.
			if i%2 == 0 {
				_, _ = d.Open(0, "demo", chains.OpenOptions{})
			} else {
				_, _ = d.Close(0, "demo", chains.CloseOptions{})
			}
			d.ListChains()
		}(i)
	}
	wg.Wait()
	waitFor(t, "idle", func() bool {
		var idle bool
		d.do(func() { cs := d.chains["demo"]; idle = cs.running == nil && cs.pending == nil })
		return idle
	})
	st, err := d.Status(context.Background(), "demo")
	if err != nil {
		t.Fatal(err)
	}
	switch rec.last("demo") {
	case dbusapi.ChainOpen:
		if !st.Open() {
			t.Errorf("open but %+v", st)
		}
	case dbusapi.ChainClosed, dbusapi.ChainWaiting:
		if !st.Closed() {
			t.Errorf("closed but %+v", st)
		}
	default:
		t.Errorf("ended %v", rec.states["demo"])
	}
	if _, err := d.Open(0, "nope", chains.OpenOptions{}); !dbusapi.IsErrorName(toRemote(err), dbusapi.NoSuchChain) {
		t.Errorf("unknown chain: %v", err)
	}
}

func toRemote(err error) error {
	var e *dbusapi.Error
	if errors.As(err, &e) {
		return &dbusapi.RemoteError{Name: dbusapi.ErrorPrefix + string(e.Name), Msg: e.Msg}
	}
	return err
}

func TestLoopCancelRollsBack(t *testing.T) {
	f, d, rec := startLoop(t)
	if err := f.Client.Start(context.Background(), "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
	d.Close(0, "demo", chains.CloseOptions{})
	waitFor(t, "closed", func() bool { return rec.last("demo") == dbusapi.ChainClosed })
	// Hold the second attach, then cancel the open while it waits there.
	fault, attach := holding(control.Fault{Method: "admin.vm.device.block.Attach", Dest: "work", Count: 1})
	f.AddFault(fault)
	id, err := d.Open(0, "demo", chains.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	attach.wait(t, "the open's second attach")
	if err := d.CancelJob(0, id); err != nil {
		t.Fatal(err)
	}
	// qubesd finishes an attach whose client gave up, so the cancel takes effect when it
	// has answered; then the open is rolled back, the attach included.
	attach.release()
	if jobDone(t, rec, id) {
		t.Error("a canceled job reported success")
	}
	st, err := d.Status(context.Background(), "demo")
	if err != nil || !st.Closed() {
		t.Errorf("after cancel: %+v %v", st, err)
	}
	if got := rec.last("demo"); got != dbusapi.ChainClosed {
		t.Errorf("a canceled open ends %s, want closed (rolled back)", got)
	}
	if err := d.CancelJob(0, 9999); err == nil {
		t.Error("canceling an unknown job succeeded")
	}
}

// Failed ad-hoc opens leave nothing behind: no chain object, no journal file, however
// many are asked for (each here fails after it started: the container is missing).
func TestLoopFailedAdhocChainsAreRemoved(t *testing.T) {
	f, d, rec := startLoop(t)
	if err := f.Client.Start(context.Background(), "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
	const n = 30
	for i := 0; i < n; i++ {
		c := &chains.Chain{SourceVM: "sys-usb", SourceFile: "/home/user/nothing.luks", Key: fmt.Sprintf("k%d", i%10),
			Hops: []chains.Hop{{VM: "mediator"}, {VM: "work"}}, Type: "luks"}
		c.Name = chains.AdhocName(c)
		id, err := d.OpenAdhoc(0, c, chains.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if jobDone(t, rec, id) {
			t.Fatalf("open %d of a missing container succeeded", i)
		}
	}
	waitFor(t, "only the configured chain is left", func() bool { return len(d.ListChains()) == 1 })
	files, _ := filepath.Glob(filepath.Join(d.o.StateDir, "chains", "*"))
	for _, f := range files {
		if filepath.Base(f) != "demo.json" {
			t.Errorf("journal file left: %s", f)
		}
	}
}

// Two chains may share a mapper name in a qube (one container reached through two
// files or sources), never be open at once: the second waits, naming the first, and
// opens when the first has closed; asking for it meanwhile is refused.
func TestLoopSharedMapperOneAtATime(t *testing.T) {
	copyChain := strings.Replace(loopDemoChain, "/home/user/demo.luks", "/home/user/copy.luks", 1)
	f, d, rec := startLoopWith(t, map[string]string{"demo": loopDemoChain, "copy": copyChain})
	f.Sh(t, "sys-usb", "cp /home/user/demo.luks /home/user/copy.luks")
	if err := f.Client.Start(context.Background(), "work"); err != nil {
		t.Fatal(err)
	}
	// One of them opens, the other waits for it.
	state := func(name string) (dbusapi.ChainState, string) {
		for _, ci := range d.ListChains() {
			if ci.Name == name {
				return ci.State, ci.Waiting
			}
		}
		return "", ""
	}
	first, second := "", ""
	waitFor(t, "one open, the other waiting", func() bool {
		a, _ := state("copy")
		b, _ := state("demo")
		switch {
		case a == dbusapi.ChainOpen && b == dbusapi.ChainWaiting:
			first, second = "copy", "demo"
		case b == dbusapi.ChainOpen && a == dbusapi.ChainWaiting:
			first, second = "demo", "copy"
		}
		return first != ""
	})
	if _, waiting := state(second); waiting != "waiting for chain "+first+" (it has mapper demo in mediator)" {
		t.Errorf("%s waits with %q", second, waiting)
	}
	if _, err := d.Open(0, second, chains.OpenOptions{}); err == nil || !strings.Contains(err.Error(), "while chain "+first+" (it has mapper demo in mediator) is not closed") {
		t.Errorf("open of %s while %s is open: %v", second, first, err)
	}
	if id, err := d.Close(0, first, chains.CloseOptions{}); err != nil || !jobDone(t, rec, id) {
		t.Fatalf("close of %s: %v", first, err)
	}
	waitFor(t, second+" opens", func() bool { return rec.last(second) == dbusapi.ChainOpen })
	if got := string(f.Sh(t, "work", "cat /proc/mounts | grep -c /mnt/demo").Stdout); got != "1\n" {
		t.Errorf("mounts of /mnt/demo in work: %q", got)
	}
}

// jobDone waits for a job's end and returns whether it succeeded.
func jobDone(t *testing.T, rec *recorder, id uint64) bool {
	t.Helper()
	var ok, seen bool
	waitFor(t, fmt.Sprintf("job %d ends", id), func() bool {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		ok, seen = rec.jobs[id]
		return seen
	})
	return ok
}

// The states the daemon shows are what happened: a restart does not reopen a chain the
// user closed, nor announce a chain it finds open as newly opened; an open of an open
// chain does not flap; a manual open of a chain whose target is down leaves it waiting.
func TestLoopHonestStates(t *testing.T) {
	f := simtest.StartDemo(t, qubessim.R43)
	conf, state := t.TempDir(), t.TempDir()
	if err := os.MkdirAll(filepath.Join(conf, "demo"), 0o755); err != nil {
		t.Fatal(err)
	}
	// The default startup interval (300 s): a success must not count toward it.
	if err := os.WriteFile(filepath.Join(conf, "demo", "demo.ini"), []byte(strings.Replace(loopDemoChain, "startup interval=0\n", "", 1)), 0o644); err != nil {
		t.Fatal(err)
	}

	d, rec, stop := runLoop(t, f, conf, state)
	// A manual open while the target is halted: a clear error, the chain waits.
	waitFor(t, "waiting", func() bool { return rec.last("demo") == dbusapi.ChainWaiting })
	id, err := d.Open(0, "demo", chains.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if jobDone(t, rec, id) {
		t.Fatal("open with work halted succeeded")
	}
	if got := d.ListChains()[0]; got.State != dbusapi.ChainWaiting || got.Waiting != "waiting for work" || !strings.Contains(got.LastError, "qube not running") {
		t.Errorf("after a manual open with work halted: %+v", got)
	}
	// Started: opens; shut down: closes; started again at once: opens again (the first
	// success did not start the 300 s interval).
	for i := 0; i < 2; i++ {
		if err := f.Client.Start(context.Background(), "work"); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
		if i == 0 {
			if err := f.Client.Shutdown(context.Background(), "work", false, true); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "waiting again", func() bool { return rec.last("demo") == dbusapi.ChainWaiting })
		}
	}
	// An open of the open chain changes nothing.
	before := len(rec.states["demo"])
	if id, err = d.Open(0, "demo", chains.OpenOptions{}); err != nil || !jobDone(t, rec, id) {
		t.Fatalf("open of an open chain: %v", err)
	}
	rec.mu.Lock()
	if after := rec.states["demo"][before:]; len(after) != 0 {
		t.Errorf("an open of an open chain went through %v", after)
	}
	rec.mu.Unlock()

	// Restarted with the chain open: it is found open, not opened.
	stop()
	d, rec, stop = runLoop(t, f, conf, state)
	waitFor(t, "found open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
	rec.mu.Lock()
	if r := rec.reasons["demo"]; r[len(r)-1].Cause != dbusapi.CauseFoundOpen {
		t.Errorf("adopted with reason %q", r[len(r)-1])
	}
	rec.mu.Unlock()

	// The user closes it; a restart does not open it again, the next trigger does.
	if id, err = d.Close(0, "demo", chains.CloseOptions{}); err != nil || !jobDone(t, rec, id) {
		t.Fatalf("close: %v", err)
	}
	stop()
	d, rec, stop = runLoop(t, f, conf, state)
	var reconcile uint64 = 1 // the first job of a daemon is its chain's reconcile
	jobDone(t, rec, reconcile)
	if got := d.ListChains()[0].State; got != dbusapi.ChainClosed {
		t.Fatalf("after a restart the chain the user closed is %s", got)
	}
	// A trigger: the target stops and starts again.
	if err := f.Client.Shutdown(context.Background(), "work", false, true); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "waiting for work", func() bool { return rec.last("demo") == dbusapi.ChainWaiting })
	if err := f.Client.Start(context.Background(), "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "open after a trigger", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
	stop()
}

// A failed automatic open starts the startup interval; a later success ends it, so the
// next start of the target opens the chain at once (default interval, 300 s).
func TestLoopSuccessEndsStartupInterval(t *testing.T) {
	f := simtest.StartDemo(t, qubessim.R43)
	conf := t.TempDir()
	if err := os.MkdirAll(filepath.Join(conf, "demo"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(conf, "demo", "demo.ini"), []byte(strings.Replace(loopDemoChain, "startup interval=0\n", "", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	d, rec, _ := runLoop(t, f, conf, t.TempDir())
	waitFor(t, "waiting", func() bool { return rec.last("demo") == dbusapi.ChainWaiting })
	f.AddFault(control.Fault{Method: "admin.vm.device.block.Attach", Dest: "work", Empty: true, Count: 1})
	if err := f.Client.Start(context.Background(), "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the automatic open failed", func() bool { return rec.last("demo") == dbusapi.ChainFailed })
	if got := d.ListChains()[0]; got.RetryAt.IsZero() {
		t.Errorf("a failed automatic open scheduled no retry: %+v", got)
	}
	if id, err := d.Open(0, "demo", chains.OpenOptions{}); err != nil || !jobDone(t, rec, id) {
		t.Fatalf("manual open: %v", err)
	}
	if got := d.ListChains()[0]; !got.RetryAt.IsZero() {
		t.Errorf("open chain still shows a retry at %v", got.RetryAt)
	}
	if err := f.Client.Shutdown(context.Background(), "work", false, true); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "waiting for work", func() bool { return rec.last("demo") == dbusapi.ChainWaiting })
	if err := f.Client.Start(context.Background(), "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "open at the next start", func() bool { return rec.last("demo") != dbusapi.ChainWaiting })
	if got := d.ListChains()[0]; got.State != dbusapi.ChainOpen && got.State != dbusapi.ChainOpening {
		t.Errorf("after the target started again: %s (%s), retry at %v", got.State, got.LastError, got.RetryAt)
	}
}

// A qube paused and unpaused soon after its start (within qrexec_timeout, when R4.2's
// own domain-unpaused of a start comes) is unpaused: its chain opens.
func TestLoopUnpauseSoonAfterStart(t *testing.T) {
	f, d, rec := startLoop(t)
	waitFor(t, "waiting", func() bool { return rec.last("demo") == dbusapi.ChainWaiting })
	ctx := context.Background()
	if err := f.Client.Start(ctx, "mediator"); err != nil {
		t.Fatal(err)
	}
	if err := f.Client.Pause(ctx, "mediator"); err != nil {
		t.Fatal(err)
	}
	if err := f.Client.Start(ctx, "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "waiting for the paused mediator", func() bool {
		return d.ListChains()[0].Waiting == "waiting for mediator (paused)"
	})
	if err := f.Client.Unpause(ctx, "mediator"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "open after the unpause", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
}

// The target is started again while the automatic close after its shutdown runs: when
// the close ends, the chain opens (the start is not lost).
func TestLoopStartDuringAutoClose(t *testing.T) {
	f, d, rec := startLoop(t)
	ctx := context.Background()
	if err := f.Client.Start(ctx, "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
	fault, detach := holding(control.Fault{Method: "admin.vm.device.block.Detach", Dest: "mediator", Count: 1})
	f.AddFault(fault)
	if err := f.Client.Shutdown(ctx, "work", false, true); err != nil {
		t.Fatal(err)
	}
	detach.wait(t, "the automatic close's detach in mediator")
	if err := f.Client.Start(ctx, "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the loop saw work start", func() bool {
		var running bool
		d.do(func() { running = qubes.IsRunning(d.vms["work"]) })
		return running
	})
	detach.release()
	waitFor(t, "open again", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
}

// qubesd reconnects while a close waits in a call that then fails (qubesd went away
// under it): the chain, skipped by the reconnect's reconcile while its job ran, is
// reconciled when the job ends degraded, and the close is finished by the journal.
func TestLoopReconcileMissedDuringAJob(t *testing.T) {
	f, d, rec := startLoop(t)
	ctx := context.Background()
	if err := f.Client.Start(ctx, "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
	fault, detach := holding(control.Fault{Method: "admin.vm.device.block.Detach", Dest: "work", Count: 1, Empty: true})
	f.AddFault(fault)
	id, err := d.Close(0, "demo", chains.CloseOptions{})
	if err != nil {
		t.Fatal(err)
	}
	detach.wait(t, "the close's detach in work")
	f.DropEventStreams()
	waitFor(t, "the loop reconnected while the close waits", func() bool {
		var done bool
		d.do(func() { done = d.resyncGen >= 2 && d.connected && d.eventSince == nil })
		return done
	})
	detach.release()
	if jobDone(t, rec, id) {
		t.Fatal("the close succeeded although its detach failed")
	}
	waitFor(t, "closed by the reconcile", func() bool { return rec.last("demo") == dbusapi.ChainClosed })
	var c *chains.Chain
	d.do(func() { c = d.chains["demo"].c })
	if st, err := d.engine.Status(ctx, c); err != nil || !st.Closed() {
		t.Errorf("after the reconcile: %+v %v", st, err)
	}
}

// openedThenStopped runs the daemon with chain demo and a chain "other" that waits for
// a qube that does not exist, opens demo and stops the daemon: how the restart
// scenarios begin.
func openedThenStopped(t *testing.T) (f *simtest.Fixture, conf, state string) {
	t.Helper()
	f = simtest.StartDemo(t, qubessim.R43)
	conf, state = t.TempDir(), t.TempDir()
	if err := os.MkdirAll(filepath.Join(conf, "demo"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(conf, "demo", "demo.ini"), []byte(loopDemoChain), 0o644); err != nil {
		t.Fatal(err)
	}
	other := strings.NewReplacer("key=demo", "key=other", "demo.luks", "other.luks", "destination vm 2=work", "destination vm 2=vault").Replace(loopDemoChain)
	if err := os.WriteFile(filepath.Join(conf, "demo", "other.ini"), []byte(other), 0o644); err != nil {
		t.Fatal(err)
	}
	_, rec, stop := runLoop(t, f, conf, state)
	if err := f.Client.Start(context.Background(), "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
	stop()
	return f, conf, state
}

// A corrupt journal file at start-up: its chain, found partly open, is degraded with an
// error naming the file; another chain is not affected.
func TestLoopCorruptJournalAtStartup(t *testing.T) {
	f, conf, state := openedThenStopped(t)
	f.Sh(t, "work", "umount /mnt/demo && cryptsetup close demo")
	journal := filepath.Join(state, "chains", "demo.json")
	if err := os.WriteFile(journal, []byte(`{"chain": "demo", "op": "op`), 0o600); err != nil { // truncated
		t.Fatal(err)
	}
	d, rec, _ := runLoop(t, f, conf, state)
	waitFor(t, "demo degraded", func() bool { return rec.last("demo") == dbusapi.ChainDegraded })
	waitFor(t, "other waits", func() bool { return rec.last("other") == dbusapi.ChainWaiting })
	for _, ci := range d.ListChains() {
		if ci.Name == "demo" && !strings.Contains(ci.LastError, journal) {
			t.Errorf("demo's error does not name the journal file: %q", ci.LastError)
		}
		if ci.Name == "other" && (ci.Waiting != "waiting for vault (no such qube)" || ci.LastError != "") {
			t.Errorf("other: %+v", ci)
		}
	}
}

// An event flood: work started and shut down 50 times as fast as qubesd does it. The
// chain ends as the world does: open with work running at the end, nothing left over.
func TestLoopStartStopFlood(t *testing.T) {
	f, d, rec := startLoop(t)
	waitFor(t, "waiting", func() bool { return rec.last("demo") == dbusapi.ChainWaiting })
	ctx := context.Background()
	for i := 0; i < 50; i++ {
		if err := f.Client.Start(ctx, "work"); err != nil {
			t.Fatal(err)
		}
		if err := f.Client.Shutdown(ctx, "work", false, true); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Client.Start(ctx, "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "open at the end", func() bool {
		var idle bool
		d.do(func() {
			cs := d.chains["demo"]
			idle = cs.running == nil && cs.pending == nil && cs.state == dbusapi.ChainOpen
		})
		return idle
	})
	var c *chains.Chain
	d.do(func() { c = d.chains["demo"].c })
	if st, err := d.engine.Status(ctx, c); err != nil || !st.Open() {
		t.Errorf("after the flood: %+v %v", st, err)
	}
	if got := string(f.Sh(t, "sys-usb", "losetup -a | wc -l").Stdout); got != "1\n" {
		t.Errorf("loop devices in sys-usb: %q", got)
	}
}

// A chain file changed after the user closed its chain is a new chain: the reload opens
// it when its qubes run, as for any new chain (the e2e plug scenario found this).
func TestLoopReloadClearsUserClose(t *testing.T) {
	f := simtest.StartDemo(t, qubessim.R43)
	conf, state := t.TempDir(), t.TempDir()
	if err := os.MkdirAll(filepath.Join(conf, "demo"), 0o755); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(conf, "demo", "demo.ini")
	if err := os.WriteFile(file, []byte(loopDemoChain), 0o644); err != nil {
		t.Fatal(err)
	}
	d, rec, _ := runLoop(t, f, conf, state)
	if err := f.Client.Start(context.Background(), "work"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
	if id, err := d.Close(0, "demo", chains.CloseOptions{}); err != nil || !jobDone(t, rec, id) {
		t.Fatalf("close: %v", err)
	}
	if err := os.WriteFile(file, []byte(strings.Replace(loopDemoChain, "/mnt/demo", "/mnt/other", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Reload(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the changed chain opens", func() bool {
		cs := d.ListChains()
		return len(cs) == 1 && cs[0].State == dbusapi.ChainOpen && cs[0].MountPoint == "/mnt/other"
	})
}

// A state directory that became read-only or full while qcryptd was stopped: at the
// start the open chain is found open from its journal, a close still takes it down,
// an open is refused with an error naming the journal file and changes nothing, and the
// other chain is not affected. Needs root (a read-only bind mount, a full tmpfs).
func TestLoopReadOnlyOrFullStateDir(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount the state directory read-only or full")
	}
	mount := func(t *testing.T, args ...string) {
		t.Helper()
		if out, err := exec.Command("mount", args...).CombinedOutput(); err != nil {
			t.Fatalf("mount %v: %v: %s", args, err, out)
		}
	}
	for name, spoil := range map[string]func(t *testing.T, state string){
		"read-only": func(t *testing.T, state string) {
			mount(t, "--bind", state, state)
			t.Cleanup(func() { _ = exec.Command("umount", state).Run() }) // gone with the temp dir anyway
			mount(t, "-o", "remount,bind,ro", state)
		},
		"full": func(t *testing.T, state string) {
			// The journal moves onto a tiny tmpfs that is then filled up.
			saved := t.TempDir()
			if err := exec.Command("cp", "-a", state+"/.", saved).Run(); err != nil {
				t.Fatal(err)
			}
			mount(t, "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", state)
			t.Cleanup(func() { _ = exec.Command("umount", state).Run() }) // gone with the temp dir anyway
			if err := exec.Command("cp", "-a", saved+"/.", state).Run(); err != nil {
				t.Fatal(err)
			}
			// dd fails with ENOSPC: a full file system is the point.
			_ = exec.Command("dd", "if=/dev/zero", "of="+filepath.Join(state, "filler"), "bs=4k").Run()
		},
	} {
		t.Run(name, func(t *testing.T) {
			f, conf, state := openedThenStopped(t)
			spoil(t, state)

			d, rec, _ := runLoop(t, f, conf, state)
			waitFor(t, "demo found open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
			waitFor(t, "other waits", func() bool { return rec.last("other") == dbusapi.ChainWaiting })
			id, err := d.Close(0, "demo", chains.CloseOptions{})
			if err != nil || !jobDone(t, rec, id) {
				t.Fatalf("close without a journal: %v", err)
			}
			var c *chains.Chain
			d.do(func() { c = d.chains["demo"].c })
			if st, err := d.engine.Status(context.Background(), c); err != nil || !st.Closed() {
				t.Fatalf("after the close: %+v %v", st, err)
			}
			id, err = d.Open(0, "demo", chains.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if jobDone(t, rec, id) {
				t.Fatal("opened without a journal")
			}
			journal := filepath.Join(state, "chains", "demo.json")
			for _, ci := range d.ListChains() {
				switch {
				case ci.Name == "demo" && !strings.Contains(ci.LastError, "cannot write journal "+journal):
					t.Errorf("the refused open does not name the journal file: %q", ci.LastError)
				case ci.Name == "other" && (ci.State != dbusapi.ChainWaiting || ci.LastError != ""):
					t.Errorf("other: %+v", ci)
				}
			}
			if st, err := d.engine.Status(context.Background(), c); err != nil || !st.Closed() {
				t.Errorf("the refused open changed something: %+v %v", st, err)
			}
		})
	}
}

// At a system shutdown the daemon closes every open chain (the cause says why), refuses
// new work and opens nothing, then stops by itself: qubes-core stops the qubes after it.
func TestLoopSystemShutdownClosesEverything(t *testing.T) {
	other := strings.NewReplacer("key=demo", "key=other", "demo.luks", "other.luks", "/mnt/demo", "/mnt/other").Replace(loopDemoChain)
	f := simtest.StartDemo(t, qubessim.R43)
	f.Sh(t, "sys-usb", "cp /home/user/demo.luks /home/user/other.luks")
	for _, vm := range []string{"mediator", "work"} {
		if err := f.Client.Start(context.Background(), vm); err != nil {
			t.Fatal(err)
		}
		f.Sh(t, vm, "cp /home/user/.qcrypt/keys/demo /home/user/.qcrypt/keys/other")
	}
	d, rec, _ := runLoop(t, f, writeConf(t, map[string]string{"demo": loopDemoChain, "other": other}), t.TempDir())
	if !testkit.Within(30*time.Second, func() bool { return rec.last("demo") == dbusapi.ChainOpen && rec.last("other") == dbusapi.ChainOpen }) {
		t.Fatalf("not both open: %v %v", rec.states, rec.reasons)
	}

	d.SystemShutdown()
	if _, err := d.Open(0, "demo", chains.OpenOptions{}); err == nil || !strings.Contains(err.Error(), "the system is shutting down") {
		t.Errorf("an open during the shutdown: %v", err)
	}
	select {
	case <-d.ended:
	case <-time.After(2 * time.Minute):
		t.Fatal("the daemon did not stop after closing everything")
	}
	for _, name := range []string{"demo", "other"} {
		rec.mu.Lock()
		states, reasons := rec.states[name], rec.reasons[name]
		rec.mu.Unlock()
		if n := len(states); n < 2 || states[n-2] != dbusapi.ChainClosing || reasons[n-2].Cause != dbusapi.CauseSystemShutdown || states[n-1] != dbusapi.ChainClosed {
			t.Errorf("%s: states %v, reasons %v; want closing (system-shutdown), closed at the end", name, states, reasons)
		}
	}
	for _, vm := range []string{"mediator", "work"} {
		if out := string(f.Sh(t, vm, "ls /dev/mapper").Stdout); out != "" {
			t.Errorf("%s still has %q", vm, out)
		}
	}
	if _, err := d.Open(0, "demo", chains.OpenOptions{}); err == nil {
		t.Error("an open was taken after the daemon stopped")
	}
}

// An ad-hoc chain qcryptd opened is its to manage after a restart too: the journal keeps
// the chain, the new daemon finds it open, and closes it like any other (at a system
// shutdown as well).
func TestLoopAdhocChainsAcrossARestart(t *testing.T) {
	f := simtest.StartDemo(t, qubessim.R43)
	state := t.TempDir()
	conf := writeConf(t, map[string]string{})
	d, rec, stop := runLoop(t, f, conf, state)
	c := &chains.Chain{SourceVM: "sys-usb", SourceFile: qubessim.DemoContainer, Key: "demo", MountPoint: "/mnt/adhoc",
		Hops: []chains.Hop{{VM: "mediator"}, {VM: "work", Ciphers: []string{"aes-xts-plain64"}}}, Autostart: true, Type: "luks"}
	c.Name = chains.AdhocName(c)
	id, err := d.OpenAdhoc(0, c, chains.OpenOptions{Autostart: true})
	if err != nil {
		t.Fatal(err)
	}
	if !jobDone(t, rec, id) {
		t.Fatalf("the ad-hoc open failed: %v", rec.reasons[c.Name])
	}
	stop()

	d2, rec2, _ := runLoop(t, f, conf, state)
	waitFor(t, "the ad-hoc chain found open", func() bool { return rec2.last(c.Name) == dbusapi.ChainOpen })
	rec2.mu.Lock()
	cause := rec2.reasons[c.Name][len(rec2.reasons[c.Name])-1].Cause
	rec2.mu.Unlock()
	if cause != dbusapi.CauseFoundOpen {
		t.Errorf("taken back with the cause %s, want found-open", cause)
	}
	list := d2.ListChains()
	if len(list) != 1 || list[0].Managed || list[0].Name != c.Name {
		t.Fatalf("chains after the restart: %+v", list)
	}
	d2.SystemShutdown()
	select {
	case <-d2.ended:
	case <-time.After(2 * time.Minute):
		t.Fatal("the daemon did not stop")
	}
	if out := string(f.Sh(t, "work", "ls /dev/mapper").Stdout); out != "" {
		t.Errorf("work still has %q after the shutdown", out)
	}
	if files, _ := filepath.Glob(filepath.Join(state, "chains", "*")); len(files) != 0 {
		t.Errorf("journal files left: %v", files)
	}
}
