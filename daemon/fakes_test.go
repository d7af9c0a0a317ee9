package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/testkit"
	"github.com/qcrypt/qcrypt/systemd"
)

// The loop's reactions against fakes: qubesd is a list of qubes and an event stream the
// test writes, the engine records what it is asked and answers as told. No simulator,
// no sandbox: these run anywhere.

type fakeQubes struct {
	chains.Qubes // the engine's part of the interface: a fake engine never calls it
	mu           sync.Mutex
	states       map[string]string
	events       chan qubes.Event
}

func newFakeQubes(running ...string) *fakeQubes {
	f := &fakeQubes{states: map[string]string{"dom0": qubes.StateRunning, "sys-usb": qubes.StateHalted,
		"mediator": qubes.StateHalted, "work": qubes.StateHalted}, events: make(chan qubes.Event, 64)}
	for _, vm := range running {
		f.states[vm] = qubes.StateRunning
	}
	f.events <- qubes.Event{Kind: qubes.EventResync}
	return f
}

func (f *fakeQubes) ListVMs(context.Context) ([]qubes.VM, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []qubes.VM
	for name, st := range f.states {
		class := "AppVM"
		if name == "dom0" {
			class = qubes.ClassAdminVM
		}
		out = append(out, qubes.VM{Name: name, Class: class, State: st})
	}
	return out, nil
}

func (f *fakeQubes) Events(context.Context, qubes.Backoff) <-chan qubes.Event { return f.events }
func (f *fakeQubes) DeviceAPI(context.Context) (qubes.DeviceAPI, error) {
	return qubes.DeviceAPIOld, nil
}
func (f *fakeQubes) DefaultQrexecTimeout(context.Context) (int, error) { return 60, nil }
func (f *fakeQubes) Available(context.Context, string) ([]qubes.BlockDevice, error) {
	return nil, nil
}

// set changes a qube's power state and sends the event qubesd would.
func (f *fakeQubes) set(vm, state string, kind qubes.EventKind) {
	f.mu.Lock()
	f.states[vm] = state
	f.mu.Unlock()
	f.events <- qubes.Event{Kind: kind, Subject: vm}
}

// fakeEngine opens and closes chains in memory; openErr, when set, fails the next opens;
// closeErr fails the next closes as a close fails when a qube goes down under it (its
// layers are gone all the same); closing, when set, runs inside the next close.
type fakeEngine struct {
	mu       sync.Mutex
	open     map[string]bool
	openErr  error
	opening  func() // runs inside the next open
	closeErr error
	closing  func()
	calls    []string       // "open demo", "close demo", ...
	statuses map[string]int // Status calls per chain (reconciles and checks)
	// stores are the key stores (directory -> password); unlocked, those unlocked.
	stores   map[string]string
	unlocked map[string]bool
}

func (e *fakeEngine) record(call string) {
	e.mu.Lock()
	e.calls = append(e.calls, call)
	e.mu.Unlock()
}

func (e *fakeEngine) Open(_ context.Context, c *chains.Chain, _ chains.OpenOptions, _ chains.ProgressFunc) error {
	e.record("open " + c.Name)
	e.mu.Lock()
	opening := e.opening
	e.opening = nil
	e.mu.Unlock()
	if opening != nil {
		opening()
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.openErr != nil {
		return e.openErr
	}
	for _, dir := range c.KeystoreDirs() {
		if !e.unlocked[dir] {
			return fmt.Errorf("cannot open %s: key store %s: %w", c.Name, dir, chains.ErrKeystoreLocked)
		}
	}
	e.open[c.Name] = true
	return nil
}

func (e *fakeEngine) Close(ctx context.Context, c *chains.Chain, _ chains.CloseOptions, how chains.Closing, _ chains.ProgressFunc) error {
	e.record("close " + c.Name)
	if how.BeforeSteps != nil {
		how.BeforeSteps(ctx)
	}
	e.mu.Lock()
	delete(e.open, c.Name)
	err, closing := e.closeErr, e.closing
	e.closeErr, e.closing = nil, nil
	e.mu.Unlock()
	if closing != nil {
		closing()
	}
	return err
}

func (e *fakeEngine) Status(_ context.Context, c *chains.Chain) (*chains.Status, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.statuses == nil {
		e.statuses = map[string]int{}
	}
	e.statuses[c.Name]++
	st := &chains.Status{Chain: c.Name, SourceVM: c.SourceVM, Missing: 2 * len(c.Hops), Source: chains.SourceFile}
	for _, h := range c.Hops {
		st.Hops = append(st.Hops, chains.HopStatus{VM: h.VM})
	}
	if e.open[c.Name] {
		st.Missing, st.Source = 0, chains.SourceLoop
		for i := range st.Hops {
			st.Hops[i].Running, st.Hops[i].Attached, st.Hops[i].KeyPresent, st.Hops[i].Decrypted = true, true, true, true
		}
	}
	return st, nil
}

func (e *fakeEngine) SourcePresent(context.Context, *chains.Chain) (bool, error) { return true, nil }
func (e *fakeEngine) Discover(context.Context) ([]chains.Discovered, error)      { return nil, nil }
func (e *fakeEngine) CleanPrivateDir(context.Context) error                      { return nil }
func (e *fakeEngine) LuksInit(context.Context, chains.InitSpec, chains.ProgressFunc) error {
	return errors.New("not in the fake")
}

func (e *fakeEngine) KeystoreStatus(_ context.Context, k chains.Keystore) (chains.KeystoreState, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, exists := e.stores[k.Dir]
	return chains.KeystoreState{Dir: k.Dir, Exists: exists, Open: e.unlocked[k.Dir], Unlocked: e.unlocked[k.Dir]}, nil
}

func (e *fakeEngine) KeystoreUnlock(_ context.Context, k chains.Keystore, password []byte) error {
	e.record("unlock " + k.Dir)
	e.mu.Lock()
	defer e.mu.Unlock()
	if want, ok := e.stores[k.Dir]; !ok || string(password) != want {
		return fmt.Errorf("key store %s: %w", k.Dir, chains.ErrWrongPassword)
	}
	e.unlocked[k.Dir] = true
	return nil
}

func (e *fakeEngine) KeystoreInit(_ context.Context, k chains.Keystore, password []byte) error {
	e.record("init " + k.Dir)
	e.mu.Lock()
	defer e.mu.Unlock()
	e.stores[k.Dir] = string(password)
	e.unlocked[k.Dir] = true
	return nil
}

func (e *fakeEngine) KeystoreLock(_ context.Context, k chains.Keystore) error {
	e.record("lock " + k.Dir)
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.unlocked, k.Dir)
	return nil
}

func (e *fakeEngine) callsSoFar() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.calls...)
}

// fakeLoop runs the loop on the demo chain with fakes.
func fakeLoop(t *testing.T, q *fakeQubes, e *fakeEngine, chain string) (*Daemon, *recorder) {
	t.Helper()
	e.open, e.unlocked = map[string]bool{}, map[string]bool{}
	d, rec, _ := runLoopWith(t, Options{ConfigRoot: writeConf(t, map[string]string{"demo": chain}), StateDir: t.TempDir(),
		Qubes: q, Engine: e, AskPasswordDir: t.TempDir()})
	return d, rec
}

const fakeChain = "source vm=sys-usb\nsource file=/c.luks\nkey=demo\ndestination vm 1=mediator\n" +
	"destination vm 2=work\nstartup interval=0\n"

// The loop's reactions to qube events, one story per row: what it asks the engine and
// the states it passes through with their causes (each change also held against the
// state machine by the recorder).
func TestLoopReactsToEvents(t *testing.T) {
	waiting := func(t *testing.T, rec *recorder) {
		waitFor(t, "waiting", func() bool { return rec.last("demo") == dbusapi.ChainWaiting })
	}
	open := func(t *testing.T, rec *recorder) {
		waitFor(t, "open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
	}
	tests := map[string]struct {
		running []string
		story   func(t *testing.T, q *fakeQubes, e *fakeEngine, d *Daemon, rec *recorder)
		calls   []string
		changes []string // state/cause
	}{
		"the target starts: open": {
			running: []string{"sys-usb"},
			story: func(t *testing.T, q *fakeQubes, e *fakeEngine, d *Daemon, rec *recorder) {
				waiting(t, rec)
				q.set("work", qubes.StateRunning, qubes.EventDomainStart)
				open(t, rec)
			},
			calls:   []string{"open demo"},
			changes: []string{"waiting/qubesd-connected", "opening/qube-started", "open/done"},
		},
		"the target shuts down: close, then wait for it": {
			running: []string{"sys-usb", "work"},
			story: func(t *testing.T, q *fakeQubes, e *fakeEngine, d *Daemon, rec *recorder) {
				open(t, rec)
				q.set("work", qubes.StateHalted, qubes.EventDomainShutdown)
				waiting(t, rec)
			},
			calls: []string{"open demo", "close demo"},
			changes: []string{"opening/qubesd-connected", "open/done", "closing/qube-shut-down", "closed/done",
				"waiting/qube-shut-down"},
		},
		"an open fails: failed, and the next start tries again": {
			running: []string{"sys-usb"},
			story: func(t *testing.T, q *fakeQubes, e *fakeEngine, d *Daemon, rec *recorder) {
				waiting(t, rec)
				e.mu.Lock()
				e.openErr = errors.New("the key is wrong")
				e.mu.Unlock()
				q.set("work", qubes.StateRunning, qubes.EventDomainStart)
				waitFor(t, "failed", func() bool { return rec.last("demo") == dbusapi.ChainFailed })
				e.mu.Lock()
				e.openErr = nil
				e.mu.Unlock()
				q.set("mediator", qubes.StateRunning, qubes.EventDomainStart)
				open(t, rec)
			},
			calls: []string{"open demo", "open demo"},
			changes: []string{"waiting/qubesd-connected", "opening/qube-started", "failed/error", "opening/qube-started",
				"open/done"},
		},
		"the user closes: closed until a qube of it starts": {
			running: []string{"sys-usb", "work"},
			story: func(t *testing.T, q *fakeQubes, e *fakeEngine, d *Daemon, rec *recorder) {
				open(t, rec)
				id, err := d.Close(0, "demo", chains.CloseOptions{})
				if err != nil || !jobDone(t, rec, id) {
					t.Fatalf("close: %v", err)
				}
				q.set("mediator", qubes.StateRunning, qubes.EventDomainStart)
				open(t, rec)
			},
			calls: []string{"open demo", "close demo", "open demo"},
			changes: []string{"opening/qubesd-connected", "open/done", "closing/requested", "closed/done",
				"opening/qube-started", "open/done"},
		},
		// A qube that stops and starts fast (TestLoopStartStopFlood found it): the close
		// after its shutdown fails, the chain is degraded; its start must not leave it so.
		"a close fails as the target flaps: its start checks and opens": {
			running: []string{"sys-usb", "work"},
			story: func(t *testing.T, q *fakeQubes, e *fakeEngine, d *Daemon, rec *recorder) {
				open(t, rec)
				e.mu.Lock()
				e.closeErr = errors.New("cannot connect to work: domain not running?")
				e.mu.Unlock()
				q.set("work", qubes.StateHalted, qubes.EventDomainShutdown)
				waitFor(t, "degraded", func() bool { return rec.last("demo") == dbusapi.ChainDegraded })
				q.set("work", qubes.StateRunning, qubes.EventDomainStart)
				waitFor(t, "open again", func() bool { return rec.times("demo", dbusapi.ChainOpen) == 2 })
			},
			calls: []string{"open demo", "close demo", "open demo"},
			changes: []string{"opening/qubesd-connected", "open/done", "closing/qube-shut-down", "degraded/error",
				"closed/done", "opening/qube-started", "open/done"},
		},
		"the target starts during a close that fails: checked after it": {
			running: []string{"sys-usb", "work"},
			story: func(t *testing.T, q *fakeQubes, e *fakeEngine, d *Daemon, rec *recorder) {
				open(t, rec)
				e.mu.Lock()
				e.closeErr = errors.New("cannot connect to work: domain not running?")
				e.closing = func() {
					q.set("work", qubes.StateRunning, qubes.EventDomainStart)
					waitOffTest(t, "the start seen during the close", func() bool {
						var seen bool
						d.do(func() { seen = d.vms["work"] == qubes.StateRunning })
						return seen
					})
				}
				e.mu.Unlock()
				q.set("work", qubes.StateHalted, qubes.EventDomainShutdown)
				waitFor(t, "open again", func() bool { return rec.times("demo", dbusapi.ChainOpen) == 2 })
			},
			calls: []string{"open demo", "close demo", "open demo"},
			changes: []string{"opening/qubesd-connected", "open/done", "closing/qube-shut-down", "degraded/error",
				"closed/done", "opening/qube-started", "open/done"},
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			q, e := newFakeQubes(tc.running...), &fakeEngine{}
			d, rec := fakeLoop(t, q, e, fakeChain)
			tc.story(t, q, e, d, rec)
			if got := e.callsSoFar(); !equal(got, tc.calls) {
				t.Errorf("engine calls %v, want %v", got, tc.calls)
			}
			rec.mu.Lock()
			defer rec.mu.Unlock()
			var got []string
			for i, st := range rec.states["demo"][1:] { // the first is the chain's addition
				got = append(got, string(st)+"/"+string(rec.reasons["demo"][i+1].Cause))
			}
			if !equal(got, tc.changes) {
				t.Errorf("changes %v, want %v", got, tc.changes)
			}
		})
	}
}

// waitOffTest is waitFor for a goroutine other than the test's (a fake engine's call):
// it reports a timeout with Errorf, since only the test's goroutine may stop the test.
func waitOffTest(t *testing.T, what string, ok func() bool) {
	if !testkit.Within(30*time.Second, ok) {
		t.Errorf("timed out: %s", what)
	}
}

func equal[S ~string](a, b []S) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// An ad-hoc open that fails while qcryptd reconnects to qubesd (the resync reached the
// chain during the job) leaves nothing behind, as any failed ad-hoc open: no reconcile
// keeps the entry, so the user's next open with another spec is not refused (the
// integration test TestAdhocIdentity found it under dbus-broker's timing).
func TestLoopFailedAdhocOpenDuringResync(t *testing.T) {
	q, e := newFakeQubes("sys-usb", "work"), &fakeEngine{}
	d, rec := fakeLoop(t, q, e, fakeChain)
	waitFor(t, "open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
	c := &chains.Chain{SourceVM: "sys-usb", SourceFile: "/c.luks", Key: "other", Hops: []chains.Hop{{VM: "mediator"}, {VM: "nope"}},
		Type: "luks"}
	c.Name = chains.AdhocName(c)
	e.mu.Lock()
	e.openErr = errors.New("cannot open: qube nope does not exist")
	e.opening = func() {
		q.events <- qubes.Event{Kind: qubes.EventResync}
		waitOffTest(t, "the resync reached the running open", func() bool {
			var missed bool
			d.do(func() { missed = d.chains[c.Name] != nil && d.chains[c.Name].missedResync })
			return missed
		})
	}
	e.mu.Unlock()
	id, err := d.OpenAdhoc(0, c, chains.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if jobDone(t, rec, id) {
		t.Fatal("the open succeeded")
	}
	var left bool
	d.do(func() { _, left = d.chains[c.Name] })
	if left {
		t.Error("the failed ad-hoc chain is still there after its open ended")
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if n := e.statuses[c.Name]; n != 0 {
		t.Errorf("the failed ad-hoc chain was reconciled %d times", n)
	}
}

// A chain that injects a key from a locked key store waits for it, with its own cause
// (the notification asks to unlock); an unlock asks for the password through the
// password agent protocol, refuses a wrong one without a change, and lets the chain
// open with the right one.
func TestLoopWaitsForTheKeystore(t *testing.T) {
	const store = "/srv/keys"
	q, e := newFakeQubes("sys-usb", "work"), &fakeEngine{stores: map[string]string{store: "right"}}
	d, rec := fakeLoop(t, q, e, fakeChain+"destination inj 2=keystore://"+store+"\n")
	waitFor(t, "waiting for the store", func() bool { return rec.last("demo") == dbusapi.ChainWaiting })
	if ci := d.ListChains()[0]; !strings.Contains(ci.Waiting, "key store /srv/keys") {
		t.Errorf("waiting: %q", ci.Waiting)
	}
	unlock := func(password string) bool {
		t.Helper()
		id, err := d.KeystoreUnlock(uint32(os.Getuid()), store)
		if err != nil {
			t.Fatal(err)
		}
		r := passwordQuestion(t, d.o.AskPasswordDir, dbusapi.PasswordQuestionID(id))
		if !strings.Contains(r.Message, store) {
			t.Errorf("question %q does not name the store", r.Message)
		}
		if err := r.Answer([]byte(password)); err != nil {
			t.Fatal(err)
		}
		return jobDone(t, rec, id)
	}
	if unlock("wrong") {
		t.Fatal("a wrong password unlocked the store")
	}
	if got := rec.last("demo"); got != dbusapi.ChainWaiting {
		t.Fatalf("after a wrong password: %s", got)
	}
	if !unlock("right") {
		t.Fatal("the right password did not unlock the store")
	}
	waitFor(t, "open", func() bool { return rec.last("demo") == dbusapi.ChainOpen })
	rec.mu.Lock()
	defer rec.mu.Unlock()
	var got []string
	for i, st := range rec.states["demo"][1:] {
		got = append(got, string(st)+"/"+string(rec.reasons["demo"][i+1].Cause))
	}
	want := []string{"opening/qubesd-connected", "waiting/keystore-locked", "opening/keystore-unlocked", "open/done"}
	if !equal(got, want) {
		t.Errorf("changes %v, want %v", got, want)
	}
}

// passwordQuestion waits until the password question with id is asked in dir.
func passwordQuestion(t *testing.T, dir, id string) systemd.PasswordRequest {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := systemd.WaitPasswordRequest(ctx, dir, id)
	if err != nil {
		t.Fatalf("the password question %s: %v", id, err)
	}
	return r
}

// A key store directory is a dom0 path: only root may name any; other callers the
// default store and the stores root's chain files name (a caller-named directory would
// have root create and open files there).
func TestKeystoreDirsOthersMayName(t *testing.T) {
	q, e := newFakeQubes(), &fakeEngine{stores: map[string]string{"/srv/keys": "pw"}}
	d, _ := fakeLoop(t, q, e, fakeChain+"destination inj 2=keystore:///srv/keys\n")
	const user = 1000
	for _, tc := range []struct {
		uid  uint32
		dir  string
		deny bool
	}{
		{user, "", false}, {user, chains.DefaultKeystoreDir, false}, {user, "/srv/keys/", false},
		{user, "/etc/cron.d", true}, {user, "/srv", true}, {0, "/etc/cron.d", false},
	} {
		_, err := d.KeystoreStatus(context.Background(), tc.uid, tc.dir)
		_, jerr := d.KeystoreInit(tc.uid, tc.dir)
		c := &chains.Chain{SourceVM: "sys-usb", SourceFile: "/c.luks", Key: "k", Hops: []chains.Hop{{VM: "mediator"}, {VM: "work"}}, Type: "luks"}
		c.Name = chains.AdhocName(c)
		_, oerr := d.OpenAdhoc(tc.uid, c, chains.OpenOptions{InjectStores: map[string]string{"work": tc.dir}})
		for what, err := range map[string]error{"status": err, "init": jerr, "ad-hoc open": oerr} {
			if got := errors.Is(err, dbusapi.ErrAccessDenied); got != tc.deny {
				t.Errorf("uid %d %s %q: %v, want denied=%v", tc.uid, what, tc.dir, err, tc.deny)
			}
		}
	}
}
