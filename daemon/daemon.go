// Package daemon is qcryptd's core: the event loop that owns all mutable state, one
// state machine per chain, jobs, and the reactions to Qubes events.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubes"
)

// Publisher reflects state on the bus (dbusapi.Server implements it).
type Publisher interface {
	ChainAdded(dbusapi.ChainInfo)
	ChainChanged(c dbusapi.ChainInfo, previous dbusapi.ChainState, why dbusapi.Reason)
	ChainRemoved(name string)
	JobAdded(dbusapi.JobInfo)
	JobChanged(dbusapi.JobInfo)
	JobCompleted(j dbusapi.JobInfo, success bool)
	JobRemoved(id uint64)
	SummaryChanged(string)
}

// noPublisher is the publisher until the bus side is connected (and in tests without
// one): it shows nothing.
type noPublisher struct{}

func (noPublisher) ChainAdded(dbusapi.ChainInfo)                                       {}
func (noPublisher) ChainChanged(dbusapi.ChainInfo, dbusapi.ChainState, dbusapi.Reason) {}
func (noPublisher) ChainRemoved(string)                                                {}
func (noPublisher) JobAdded(dbusapi.JobInfo)                                           {}
func (noPublisher) JobChanged(dbusapi.JobInfo)                                         {}
func (noPublisher) JobCompleted(dbusapi.JobInfo, bool)                                 {}
func (noPublisher) JobRemoved(uint64)                                                  {}
func (noPublisher) SummaryChanged(string)                                              {}

// Qubes is what the daemon needs of the Admin API client.
type Qubes interface {
	chains.Qubes
	Events(ctx context.Context, b qubes.Backoff) <-chan qubes.Event
	DeviceAPI(ctx context.Context) (qubes.DeviceAPI, error)
	DefaultQrexecTimeout(ctx context.Context) (int, error)
}

// Engine is what the loop asks of the chain engine (chains.Engine). A loop test may give
// a fake one: the loop's reactions are then tested without qubes that run anything.
type Engine interface {
	Open(ctx context.Context, c *chains.Chain, o chains.OpenOptions, progress chains.ProgressFunc) error
	Close(ctx context.Context, c *chains.Chain, o chains.CloseOptions, how chains.Closing, progress chains.ProgressFunc) error
	Status(ctx context.Context, c *chains.Chain) (*chains.Status, error)
	SourcePresent(ctx context.Context, c *chains.Chain) (bool, error)
	Discover(ctx context.Context) ([]chains.Discovered, error)
	LuksInit(ctx context.Context, s chains.InitSpec, progress chains.ProgressFunc) error
	CleanPrivateDir(ctx context.Context) error
	KeystoreStatus(ctx context.Context, k chains.Keystore) (chains.KeystoreState, error)
	KeystoreUnlock(ctx context.Context, k chains.Keystore, password []byte) error
	KeystoreLock(ctx context.Context, k chains.Keystore) error
	KeystoreInit(ctx context.Context, k chains.Keystore, password []byte) error
}

// Options configure a daemon.
type Options struct {
	ConfigRoot, Target, StateDir string
	Qubes                        Qubes
	Runner                       chains.Runner
	Dom0                         chains.Dom0
	Log                          *logrus.Entry
	Notify                       func(state string) error // sd_notify; nil: not under systemd
	Watchdog                     time.Duration            // ping interval; 0: none
	AsRoot                       bool                     // enforce ownership rules of hook files
	Hook                         func(ctx context.Context, command string, env []string) error
	HookTimeout                  time.Duration // bounds one hook run; 0: DefaultHookTimeout
	PrivateDir                   string        // luks-init's dom0 directory; "": chains.DefaultPrivateDir
	Debounce                     time.Duration // per-qube debounce of R4.2 device-list-change
	JobLinger                    time.Duration // finished jobs stay on the bus this long
	Backoff                      qubes.Backoff
	Version                      string
	MachineID                    string // dom0's machine id for cross-machine locks; "": none
	// AskPasswordDir is where key store unlocks put their password questions;
	// "": systemd's (/run/systemd/ask-password).
	AskPasswordDir string
	// Engine does the chains' work; nil: a chains.Engine on Qubes, Runner and Dom0,
	// journaling in StateDir.
	Engine Engine
}

// Daemon is qcryptd.
type Daemon struct {
	o       Options
	log     *logrus.Entry
	engine  Engine
	journal *chains.Journal // the engine's, in StateDir
	pub     Publisher

	reqs  chan func()
	stop  chan struct{} // closed to stop Run (CloseAll with stop)
	ended chan struct{} // closed when Run has returned: nothing runs requests any more
	wg    sync.WaitGroup

	// Everything below is owned by the loop goroutine.
	chains map[string]*chainState
	vms    map[string]string // power state per qube
	// While a resync's listing is on its way, the qubes whose state an event set since:
	// the listing may predate those events and must not overwrite them.
	eventSince map[string]bool
	resyncGen  int
	devices    map[string][]string // R4.2: ports per backend, for diffing
	debounce   map[string]*time.Timer
	started    map[string]time.Time // last start per qube (domain-unpaused during starts)
	jobs       map[uint64]*job
	nextJob    uint64
	connected  bool
	newAPI     bool
	qrexecWait time.Duration
	stopping   bool
	// shuttingDown: the system is going down; every chain is being closed and nothing
	// opens any more.
	shuttingDown bool
	stopQueued   bool // a close-all will stop the daemon when its jobs end
	summary      string
}

type chainState struct {
	c           *chains.Chain
	managed     bool
	state       dbusapi.ChainState
	waiting     string
	step, steps int
	lastError   string
	lastChange  time.Time
	lastAttempt time.Time
	retryAt     time.Time
	retry       *time.Timer
	running     *job
	pending     *job
	removed     bool // dropped by a reload: remove once closed
	// trigger is an event that could open the chain (a qube started) and came while a
	// close ran or waited; it is evaluated when that close ends, not lost.
	trigger dbusapi.Reason
	// missedResync: qubesd's connection was (re)established while a job ran, so the
	// chain was not reconciled; if that job ends degraded or failed, it is then.
	missedResync bool
	// held: qcryptd's record of the chain is continuous since a job of its own found it
	// open (see chains.Closing.Held). breaks counts what ends that: a gap in the event
	// stream, a qube of the chain shut down, a device of one removed; a job holds the
	// chain only if none came while it ran.
	held   bool
	breaks uint64
}

type job struct {
	id        uint64
	op        dbusapi.JobOperation
	chain     *chainState
	auto      bool
	uid       uint32
	openOpts  chains.OpenOptions
	closeOpts chains.CloseOptions
	held      bool   // a close: its chain was held when it started
	breaks    uint64 // the chain's breaks when the job started
	spec      chains.InitSpec
	release   func() // closes the caller's files (luks-init)
	keystore  string // the store of a keystore-unlock or -lock
	reason    dbusapi.Reason
	state     dbusapi.JobState
	step      int
	steps     int
	desc      string
	bytes     uint64
	total     uint64
	message   string
	cancel    context.CancelFunc
	canceled  bool
	done      []func(success bool) // run in the loop when the job ends
}

// New loads the config target and prepares the daemon; Run starts it.
func New(o Options) (*Daemon, error) {
	if o.Log == nil {
		o.Log = logrus.NewEntry(logrus.StandardLogger())
	}
	if o.Debounce == 0 {
		o.Debounce = 300 * time.Millisecond
	}
	if o.JobLinger == 0 {
		o.JobLinger = time.Minute
	}
	if o.Backoff == (qubes.Backoff{}) {
		o.Backoff = qubes.DefaultBackoff
	}
	if o.HookTimeout == 0 {
		o.HookTimeout = DefaultHookTimeout
	}
	if o.Hook == nil {
		o.Hook = hookRunner(o.HookTimeout, o.Log)
	}
	d := &Daemon{o: o, log: o.Log, reqs: make(chan func(), 256), stop: make(chan struct{}), ended: make(chan struct{}),
		chains: map[string]*chainState{}, vms: map[string]string{}, devices: map[string][]string{},
		debounce: map[string]*time.Timer{}, started: map[string]time.Time{}, jobs: map[uint64]*job{},
		qrexecWait: 60 * time.Second, pub: noPublisher{}}
	d.journal = &chains.Journal{Dir: o.StateDir}
	d.engine = o.Engine
	if d.engine == nil {
		d.engine = &chains.Engine{Qubes: o.Qubes, Runner: o.Runner, Dom0: o.Dom0, Log: o.Log, Journal: d.journal,
			PrivateDir: o.PrivateDir, MachineID: o.MachineID}
	}
	dir, err := chains.TargetDir(o.Target, o.ConfigRoot)
	if err != nil {
		return nil, err
	}
	loaded, err := chains.LoadTarget(dir, o.AsRoot)
	if err != nil {
		return nil, fmt.Errorf("cannot load config target %s: %w", dir, err)
	}
	for _, c := range loaded {
		d.chains[c.Name] = &chainState{c: c, managed: true, state: dbusapi.ChainClosed, lastChange: time.Now()}
	}
	// Ad-hoc chains qcryptd opened before it restarted: the reconcile finds them open (or
	// rolls back what an interrupted job did), as configured ones.
	adhoc, errs := d.journal.Adhoc()
	for _, err := range errs {
		d.log.WithError(err).Warn("cannot take an ad-hoc chain back from the journal")
	}
	for _, c := range adhoc {
		if _, configured := d.chains[c.Name]; !configured {
			d.chains[c.Name] = &chainState{c: c, state: dbusapi.ChainClosed, lastChange: time.Now()}
		}
	}
	return d, nil
}

// SetPublisher connects the bus side and publishes every chain. Call before Run.
func (d *Daemon) SetPublisher(p Publisher) { d.publishAll(p) }

// Republish moves the bus side to p while Run runs (a new bus connection after the bus
// restarted): every chain and job is published there again. exportFirst runs in the
// loop before, so the new side reads the state it exports consistently.
func (d *Daemon) Republish(p Publisher, exportFirst func() error) error {
	var err error
	if !d.do(func() {
		if err = exportFirst(); err == nil {
			d.publishAll(p)
		}
	}) {
		return errors.New("cannot publish: qcryptd is stopping")
	}
	return err
}

func (d *Daemon) publishAll(p Publisher) {
	d.pub = p
	for _, name := range d.sortedNames() {
		p.ChainAdded(d.info(d.chains[name]))
	}
	ids := make([]uint64, 0, len(d.jobs))
	for id := range d.jobs {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		p.JobAdded(d.jobs[id].info())
	}
	d.summary = "" // publish it again
	d.updateSummary()
}

func (d *Daemon) sortedNames() []string {
	names := make([]string, 0, len(d.chains))
	for n := range d.chains {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Run is the event loop. It returns when ctx ends (chains stay open; running jobs are
// canceled between steps and rolled back) or after CloseAll with stop.
func (d *Daemon) Run(ctx context.Context) error {
	defer close(d.ended)
	// Keys of a luks-init cut short by a crash must not outlive it.
	cleanCtx, cancelClean := context.WithTimeout(ctx, time.Minute)
	if err := d.engine.CleanPrivateDir(cleanCtx); err != nil {
		d.log.WithError(err).Error("cannot clean luks-init's private directory")
	}
	cancelClean()
	ctx, cancelEvents := context.WithCancel(ctx)
	defer cancelEvents()
	events := d.o.Qubes.Events(ctx, d.o.Backoff)
	var watchdog <-chan time.Time
	if d.o.Watchdog > 0 {
		t := time.NewTicker(d.o.Watchdog)
		defer t.Stop()
		watchdog = t.C
	}
	for {
		select {
		case <-ctx.Done():
			d.shutdown()
			return nil
		case <-d.stop:
			d.shutdown()
			return nil
		case ev, ok := <-events:
			if ok {
				d.handleEvent(ev)
			}
		case f := <-d.reqs:
			f()
		case <-watchdog:
			d.notify("WATCHDOG=1")
		}
	}
}

// shutdown cancels running jobs and waits for them (their rollbacks included).
func (d *Daemon) shutdown() {
	d.stopping = true
	d.notify("STOPPING=1")
	for _, j := range d.jobs {
		if j.cancel != nil {
			j.cancel()
		}
	}
	done := make(chan struct{})
	go func() { d.wg.Wait(); close(done) }()
	for {
		select {
		case <-done:
			return
		case f := <-d.reqs:
			f() // let finishing jobs report
		}
	}
}

// post runs f in the loop; it is how goroutines report back.
func (d *Daemon) post(f func()) { d.reqs <- f }

// do runs f in the loop and waits for it: how the bus side reaches the state. It
// reports false, without running f, once Run has returned.
func (d *Daemon) do(f func()) bool {
	done := make(chan struct{})
	select {
	case d.reqs <- func() { f(); close(done) }:
	case <-d.ended:
		return false
	}
	select {
	case <-done:
		return true
	case <-d.ended:
		return false
	}
}

func (d *Daemon) notify(state string) {
	if d.o.Notify != nil {
		if err := d.o.Notify(state); err != nil {
			d.log.WithError(err).Warn("cannot notify systemd")
		}
	}
}

func (d *Daemon) chainLog(cs *chainState) *logrus.Entry {
	return d.log.WithField("chain", cs.c.Name)
}

// setState changes a chain's state and publishes it.
func (d *Daemon) setState(cs *chainState, state dbusapi.ChainState, waiting string, why dbusapi.Reason) {
	prev := cs.state
	if prev == state && cs.waiting == waiting {
		d.publish(cs, prev, why)
		return
	}
	if !allowedTransition(prev, state) {
		// A bug: docs/states.md and clients' expectations do not know this change.
		d.chainLog(cs).WithFields(logrus.Fields{"state": state, "previous": prev}).Error("chain state change outside the state machine")
	}
	cs.state, cs.waiting, cs.lastChange = state, waiting, time.Now()
	if state != dbusapi.ChainOpening && state != dbusapi.ChainClosing {
		cs.step, cs.steps = 0, 0
	}
	d.chainLog(cs).WithFields(logrus.Fields{"state": state, "previous": prev, "cause": why.Cause, "reason": why.Text, "waiting": waiting}).Info("chain state changed")
	d.publish(cs, prev, why)
	d.updateSummary()
}

func (d *Daemon) publish(cs *chainState, prev dbusapi.ChainState, why dbusapi.Reason) {
	d.pub.ChainChanged(d.info(cs), prev, why)
}

func (d *Daemon) info(cs *chainState) dbusapi.ChainInfo {
	c := cs.c
	return dbusapi.ChainInfo{Name: c.Name, State: cs.state, Waiting: cs.waiting, LastError: cs.lastError,
		Target: c.Target(), MountPoint: c.MountPoint, Step: uint32(cs.step), Steps: uint32(cs.steps),
		LastChange: cs.lastChange, RetryAt: cs.retryAt, Managed: cs.managed, Autostart: c.Autostart,
		ReadOnly: c.ReadOnly, Layers: c.VMs()}
}

// updateSummary sets STATUS= and the Summary property: "3 chains: 2 open, 1 waiting for sys-usb".
func (d *Daemon) updateSummary() {
	counts := map[dbusapi.ChainState]int{}
	var waits []string
	for _, name := range d.sortedNames() {
		cs := d.chains[name]
		counts[cs.state]++
		if cs.state == dbusapi.ChainWaiting && cs.waiting != "" {
			waits = append(waits, cs.waiting)
		}
	}
	var parts []string
	for _, s := range []dbusapi.ChainState{dbusapi.ChainOpen, dbusapi.ChainOpening, dbusapi.ChainClosing, dbusapi.ChainWaiting, dbusapi.ChainDegraded, dbusapi.ChainFailed, dbusapi.ChainClosed} {
		if n := counts[s]; n > 0 {
			p := fmt.Sprintf("%d %s", n, s)
			if s == dbusapi.ChainWaiting && len(waits) > 0 {
				p += " (" + strings.Join(uniq(waits), "; ") + ")"
			}
			parts = append(parts, p)
		}
	}
	summary := fmt.Sprintf("%d chains", len(d.chains))
	if len(parts) > 0 {
		summary += ": " + strings.Join(parts, ", ")
	}
	if !d.connected {
		summary += "; waiting for qubesd"
	}
	if summary == d.summary {
		return
	}
	d.summary = summary
	d.notify("STATUS=" + summary)
	d.pub.SummaryChanged(summary)
}

func uniq(s []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, x := range s {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return out
}

func hookEnv(c *chains.Chain, op string) []string {
	return []string{"QCRYPT_CHAIN=" + c.Name, "QCRYPT_OPERATION=" + op, "QCRYPT_SOURCE_VM=" + c.SourceVM,
		"QCRYPT_SOURCE_FILE=" + c.Container(), "QCRYPT_TARGET_VM=" + c.Target(), "QCRYPT_MOUNT_POINT=" + c.MountPoint,
		"QCRYPT_KEY=" + c.Key, "QCRYPT_VMS=" + strings.Join(c.VMs(), " "), fmt.Sprintf("QCRYPT_READ_ONLY=%v", c.ReadOnly)}
}

var errSuperseded = errors.New("superseded by a later request")
