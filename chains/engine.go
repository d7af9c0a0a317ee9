package chains

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/qcrypt/qcrypt/qubes"
)

// Errors callers act on.
var (
	ErrAlreadyOpen   = errors.New("the chain is already open")
	ErrNotOpen       = errors.New("the chain is not open")
	ErrPartiallyOpen = errors.New("the chain is partially open; close it with force first")
	ErrAutostartOff  = errors.New("qube not running") // and the chain may not start it
	ErrSpoofed       = errors.New("a qube reported a device that qubesd does not show")
	ErrCanceled      = errors.New("operation canceled")
	ErrAdminVM       = errors.New("dom0 is never part of a chain")
	ErrOtherChain    = errors.New("what is open there is another chain (give the spec it was opened with)")
	ErrStaleDevice   = errors.New("a qube holds a device of a qube that is down (Qubes #4784)")
	ErrCipherRefused = errors.New("a layer does not decrypt with an allowed cipher")
)

// Step is one step of a plan: what is done, in which qube.
type Step struct {
	Kind string `json:"kind"` // start, source, attach, decrypt, mount, umount, detach, close, loop-detach, shutdown; luks-init: check, build, key, copy, keystore, done
	VM   string `json:"vm"`
	Desc string `json:"desc"`
}

// Plan is the ordered steps of an operation.
type Plan []Step

func (p Plan) String() string {
	var b strings.Builder
	for i, s := range p {
		fmt.Fprintf(&b, "%2d. [%s] %s\n", i+1, s.VM, s.Desc)
	}
	return b.String()
}

// Progress reports how far an operation is: step k of n, and bytes for copies.
type Progress struct {
	Step, Steps  int
	Desc         string
	Bytes, Total int64
}

// ProgressFunc receives progress; it must not block.
type ProgressFunc func(Progress)

// Engine opens, closes, inspects and creates chains.
type Engine struct {
	Qubes  Qubes
	Runner Runner
	Dom0   Dom0 // luks-init and the key store only
	// PrivateDir is luks-init's directory in dom0 (default DefaultPrivateDir).
	PrivateDir string
	// KeystoreMounts is where unlocked key stores are mounted in dom0 (default
	// DefaultKeystoreMounts).
	KeystoreMounts string
	Journal        *Journal // nil: no journal
	Log            *logrus.Entry
	// MachineID is dom0's /etc/machine-id, written into the cross-machine lock of a
	// read-write open ("": no locks).
	MachineID string

	mu       sync.Mutex
	users    map[string]string // default_user per qube
	statuses *qubes.Batcher[*Chain, statusResult]
}

// OpenOptions modify an open.
type OpenOptions struct {
	Autostart bool // also start the source and the target (intermediates always are)
	Force     bool // close a partially open chain first
	BreakLock bool // open read-write although another machine's lock is there
	// InjectKeys are keys the caller passed (read from descriptors it opened with its
	// own rights), per destination, injected when the qube has none.
	InjectKeys map[string][]byte
	// InjectStores names, per destination, a key store to inject its key from (an
	// ad-hoc --inj VM keystore://DIR), when the qube has none.
	InjectStores map[string]string
}

// CloseOptions modify a close.
type CloseOptions struct {
	Force          bool // shut down intermediate qubes whose layer cannot be closed
	ShutdownTarget bool // also shut down the target if its layer cannot be closed
	Eject          bool // also unmount the source device in the source qube
}

// discard is the logger of an engine without one.
var discard = func() *logrus.Entry {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return logrus.NewEntry(l)
}()

func (e *Engine) log() *logrus.Entry {
	if e.Log == nil {
		return discard
	}
	return e.Log
}

func (e *Engine) user(ctx context.Context, vm string) (string, error) {
	e.mu.Lock()
	u, ok := e.users[vm]
	e.mu.Unlock()
	if ok {
		return u, nil
	}
	u, err := e.Qubes.DefaultUser(ctx, vm)
	if err != nil {
		return "", fmt.Errorf("cannot get the default user of %s: %w", vm, err)
	}
	e.mu.Lock()
	if e.users == nil {
		e.users = map[string]string{}
	}
	e.users[vm] = u
	e.mu.Unlock()
	return u, nil
}

func (e *Engine) states(ctx context.Context) (map[string]string, error) {
	return e.memberStates(ctx, nil)
}

// memberStates is states, refusing a chain that has an AdminVM (dom0) as a member.
func (e *Engine) memberStates(ctx context.Context, c *Chain) (map[string]string, error) {
	vms, err := e.Qubes.ListVMs(ctx)
	if err != nil {
		return nil, fmt.Errorf("cannot list qubes: %w", err)
	}
	if c != nil {
		if err := adminMember(c, vms); err != nil {
			return nil, err
		}
	}
	st := map[string]string{}
	for _, vm := range vms {
		st[vm.Name] = vm.State
	}
	return st, nil
}

// adminMember refuses a chain that has an AdminVM (dom0) as a member: dom0 never
// decrypts, never serves a device and never receives one.
func adminMember(c *Chain, vms []qubes.VM) error {
	for _, vm := range vms {
		if vm.Class == qubes.ClassAdminVM && c.Involves(vm.Name) {
			return fmt.Errorf("cannot use chain %s: %w: %s", c.Name, ErrAdminVM, vm.Name)
		}
	}
	return nil
}

// run runs a script in a qube (transport failures are errors; exit codes are not).
func (e *Engine) run(ctx context.Context, vm, script string, input io.Reader) (qubes.Result, error) {
	e.log().WithField("vm", vm).Debug("running script")
	return e.Runner.Run(ctx, vm, script, input)
}

// PlanOpen lists the steps an open performs, in order: those of its actions, with every
// qube taken as halted (a running one's start step is left out when it opens).
func PlanOpen(c *Chain, o OpenOptions) Plan { return planOf((&Engine{}).openActions(c, o, nil, nil)) }

// PlanClose lists the steps a close performs, in order: those of its actions.
func PlanClose(c *Chain, o CloseOptions) Plan {
	return planOf((&Engine{}).closeActions(c, o, nil, nil))
}

func planOf(acts []action) Plan {
	p := make(Plan, len(acts))
	for i, a := range acts {
		p[i] = a.step
	}
	return p
}

func roWord(ro bool) string {
	if ro {
		return " (read-only)"
	}
	return ""
}

// action is one executable step with its undo; facts, if set, says what the step
// learned (device names), for the journal.
type action struct {
	step  Step
	layer int // 1 for the outermost layer's qube; 0 for the source and start steps
	do    func(ctx context.Context) error
	undo  func(ctx context.Context) error
	facts func() map[string]string
}

// opRule is how execute treats an operation.
type opRule struct {
	journal  bool // journaled before and after each step, for a restarted qcryptd
	rollback bool // a failure (or a cancel) undoes the completed steps
	wrap     bool // a step's error is told with the step and its qube
}

var opRules = map[string]opRule{
	"open":  {journal: true, rollback: true, wrap: true},
	"close": {journal: true, wrap: true},
	// Nothing of a luks-init is left for a restart to finish: its dom0 files go at
	// qcryptd's start (CleanPrivateDir), and its errors name what they are about.
	"luks-init": {rollback: true},
}

// execute runs actions in order, journaling before and after each as op's rule says; on
// failure (or cancellation between steps) it undoes the completed ones in reverse order
// where the rule says so.
func (e *Engine) execute(ctx context.Context, c *Chain, op string, acts []action, progress ProgressFunc) error {
	rule := opRules[op]
	rec := &Record{Chain: c.Name, Op: op}
	if c.File == "" {
		rec.Adhoc = c
	}
	rec.Started = timeNow()
	for _, a := range acts {
		rec.Steps = append(rec.Steps, RecordedStep{Step: a.step, State: "pending"})
	}
	// An open without a journal is refused (a crash would leave parts nobody can name);
	// a close never is: it takes things down, and a full or read-only state directory
	// must not keep a chain open.
	journalOK := true
	write := func() error {
		if !rule.journal {
			return nil
		}
		err := e.Journal.Write(rec)
		if err == nil || op != "close" {
			return err
		}
		if journalOK {
			e.log().WithField("chain", c.Name).WithError(err).Warn("closing without a journal")
			journalOK = false
		}
		return nil
	}
	if err := write(); err != nil {
		return err
	}
	var failed error
	// undoFrom is one past the last step to undo: completed steps, and a failed step too,
	// since it may have changed something before failing (undos are idempotent).
	undoFrom := 0
	for i, a := range acts {
		if err := ctx.Err(); err != nil {
			failed = fmt.Errorf("%w before step %d (%s)", ErrCanceled, i+1, a.step.Desc)
			break
		}
		if progress != nil {
			progress(Progress{Step: i + 1, Steps: len(acts), Desc: a.step.Desc})
		}
		rec.Steps[i].State = "running"
		if err := write(); err != nil {
			failed = err
			break
		}
		log := e.log().WithFields(logrus.Fields{"chain": c.Name, "vm": a.step.VM, "step": a.step.Kind})
		if a.layer > 0 {
			log = log.WithField("layer", a.layer)
		}
		if err := a.do(ctx); err != nil {
			log.WithError(err).Warn("step failed")
			rec.Steps[i].State = "failed"
			failed = err
			if rule.wrap {
				failed = fmt.Errorf("cannot %s in %s: %w", a.step.Desc, a.step.VM, err)
			}
			undoFrom = i + 1
			break
		}
		log.Debug("step done")
		rec.Steps[i].State = "done"
		if a.facts != nil {
			rec.Steps[i].Facts = a.facts()
		}
		undoFrom = i + 1
		if err := write(); err != nil {
			failed = err
			break
		}
	}
	if failed != nil && rule.rollback {
		// Roll back with a context of its own: a canceled or timed-out caller must not
		// leave half a chain behind.
		rctx := context.WithoutCancel(ctx)
		for i := undoFrom - 1; i >= 0; i-- {
			if acts[i].undo == nil {
				continue
			}
			if err := acts[i].undo(rctx); err != nil {
				e.log().WithFields(logrus.Fields{"chain": c.Name, "vm": acts[i].step.VM}).WithError(err).Error("rollback step failed")
				rec.Steps[i].State = "failed"
				// The open's failure keeps its class; the rollback's error is only told.
				failed = fmt.Errorf("%w; rollback of %q failed too: %v", failed, acts[i].step.Desc, err) //nolint:errorlint
			} else {
				rec.Steps[i].State = "undone"
			}
			if err := write(); err != nil {
				e.log().WithField("chain", c.Name).WithError(err).Warn("cannot journal the rollback")
			}
		}
	}
	rec.Finished = true
	if failed != nil {
		rec.Error = failed.Error()
	}
	if err := write(); err != nil && failed == nil {
		failed = err
	}
	return failed
}

// Open opens a chain: idempotent when it is open, refused when partially open unless
// forced, rolled back on failure. It never shuts a qube down.
func (e *Engine) Open(ctx context.Context, c *Chain, o OpenOptions, progress ProgressFunc) error {
	states, err := e.memberStates(ctx, c)
	if err != nil {
		return err
	}
	wasRunning := map[string]bool{}
	for i, vm := range c.VMs() {
		st, ok := states[vm]
		if !ok {
			return fmt.Errorf("cannot open %s: qube %s does not exist", c.Name, vm)
		}
		wasRunning[vm] = qubes.IsRunning(st)
		if st == qubes.StatePaused {
			return fmt.Errorf("cannot open %s: qube %s is paused", c.Name, vm)
		}
		intermediate := i > 0 && i < len(c.Hops)
		if !wasRunning[vm] && !intermediate && !o.Autostart && !c.Autostart {
			role := "source"
			if i > 0 {
				role = "target"
			}
			return fmt.Errorf("cannot open %s: %w: %s qube %s (autostart is off)", c.Name, ErrAutostartOff, role, vm)
		}
	}
	keys := make([][]byte, len(c.Hops))
	for i, h := range c.Hops {
		switch store := o.InjectStores[h.VM]; {
		case h.Inject != "":
			keys[i], err = e.injectedKey(ctx, c, h)
		case store != "":
			keys[i], err = e.KeystoreKey(ctx, Keystore{Dir: store}, h.VM, c.Key)
		default:
			keys[i] = o.InjectKeys[h.VM]
		}
		if err != nil {
			return fmt.Errorf("cannot open %s: %w", c.Name, err)
		}
	}

	// Attachments that exist already mean an open or partially open chain, checked before
	// anything changes. One from a qube that is down is stale: nothing may be stacked on it and it cannot be detached
	// (Qubes #4784), so not even a forced open goes on.
	prev := c.SourceVM
	existing := false
	for i, h := range c.Hops {
		if !wasRunning[h.VM] {
			prev = h.VM
			continue
		}
		atts, err := e.Qubes.Attached(ctx, h.VM)
		if err != nil {
			return fmt.Errorf("cannot list devices of %s: %w", h.VM, err)
		}
		// A qube started by this open has every block device slot free; one that runs
		// may have none left (R4.2: 22), which qubesd would fail with an empty response.
		api, err := e.Qubes.DeviceAPI(ctx)
		if err != nil {
			return err
		}
		if !qubes.FreeFrontend(api, atts) {
			return fmt.Errorf("cannot open %s: %s has no free block device slot (%d devices attached): close a chain there first", c.Name, h.VM, len(atts))
		}
		if !wasRunning[prev] {
			for _, a := range atts {
				if a.Backend == prev {
					return fmt.Errorf("cannot open %s: %w: %s holds %s; restart %s first", c.Name, ErrStaleDevice, h.VM, a.DeviceRef, h.VM)
				}
			}
		} else {
			mine, err := ownAttachments(ctx, e.Qubes, c, i, hopAttachments(atts, prev, i == 0), "")
			if err != nil {
				return fmt.Errorf("cannot list devices of %s: %w", prev, err)
			}
			existing = existing || len(mine) > 0
		}
		prev = h.VM
	}
	if existing {
		st, err := e.Status(ctx, c)
		if err != nil {
			return err
		}
		if st.Open() {
			return ErrAlreadyOpen
		}
		if !o.Force {
			return fmt.Errorf("cannot open %s: %w (%d steps missing)", c.Name, ErrPartiallyOpen, st.Missing)
		}
		if err := e.Close(ctx, c, CloseOptions{}, Closing{}, nil); err != nil && !errors.Is(err, ErrNotOpen) {
			return fmt.Errorf("cannot open %s: closing the partial chain first: %w", c.Name, err)
		}
	}
	return e.execute(ctx, c, "open", e.openActions(c, o, wasRunning, keys), progress)
}

// openState carries what earlier steps learned to later ones.
type openState struct {
	dev     []qubes.DeviceRef // device attached to hop i (backend side)
	feDev   []string          // its frontend device in hop i
	created bool              // the loop device was made by this open
	mounted bool              // the source device was mounted by this open
}

func (e *Engine) openActions(c *Chain, o OpenOptions, wasRunning map[string]bool, keys [][]byte) []action {
	s := &openState{dev: make([]qubes.DeviceRef, len(c.Hops)), feDev: make([]string, len(c.Hops))}
	var acts []action
	for i, vm := range c.VMs() {
		intermediate := i > 0 && i < len(c.Hops)
		if !wasRunning[vm] && (intermediate || o.Autostart || c.Autostart) {
			acts = append(acts, e.startAction(vm))
		}
	}
	acts = append(acts, e.sourceAction(c, o, s))
	for i := range c.Hops {
		acts = append(acts, e.attachAction(c, s, i), e.decryptAction(c, o, s, i, keys))
	}
	return acts
}

// startAction starts a halted qube; nothing undoes it (qcrypt never shuts a qube down
// unless asked).
func (e *Engine) startAction(vm string) action {
	return action{step: Step{"start", vm, "start " + vm + " if it is halted"},
		do: func(ctx context.Context) error { return e.Qubes.Start(ctx, vm) }}
}

// sourceAction mounts the source device when configured, takes the container's lock and
// sets up its loop device; its undo takes down what it made.
func (e *Engine) sourceAction(c *Chain, o OpenOptions, s *openState) action {
	desc := "set up a loop device for " + c.Container()
	if c.SourceDevice != "" {
		desc = "mount " + c.SourceDevice + " on " + c.SourceMountPoint + ", " + desc
	}
	return action{step: Step{"source", c.SourceVM, desc}, do: func(ctx context.Context) error {
		res, err := e.run(ctx, c.SourceVM, sourceOpenScript(c, e.MachineID, o.BreakLock), nil)
		if err != nil {
			return err
		}
		if res.ExitCode == exitLocked {
			lock := Lock{Unreadable: true}
			if m := lockedOutRE.FindSubmatch(res.Stdout); m != nil {
				lock = parseLock(string(m[1]))
			}
			return fmt.Errorf("%w: %s; it may be open there, and a synced folder would then be destroyed: open it read-only, or with --break-lock if that lock is stale", ErrLocked, lock)
		}
		if res.ExitCode > exitLoopReused+exitSourceMounted {
			return errors.New(scriptError(res.ExitCode))
		}
		m := loopOutRE.FindSubmatch(res.Stdout)
		if m == nil {
			return fmt.Errorf("%w: loop device output %q", ErrSpoofed, qubes.Printable(string(res.Stdout), 40))
		}
		if m[1] != nil {
			lock := parseLock(string(m[1]))
			log := e.log().WithFields(logrus.Fields{"chain": c.Name, "vm": c.SourceVM, "lock": lock.String()})
			if c.ReadOnly {
				log.Warn("opening read-only although another machine holds the container's lock")
			} else {
				log.Warn("breaking another machine's lock on the container, as asked")
			}
		}
		s.created = res.ExitCode&exitLoopReused == 0
		s.mounted = res.ExitCode&exitSourceMounted != 0
		s.dev[0] = qubes.DeviceRef{Backend: c.SourceVM, Port: string(m[2])}
		return e.checkExposed(ctx, s.dev[0], "")
	}, undo: func(ctx context.Context) error {
		if s.dev[0].Port == "" {
			return nil
		}
		script := sourceUndoScript(c, e.MachineID, "/dev/"+s.dev[0].Port, s.created, s.mounted)
		if script == "" {
			return nil
		}
		return e.runOK(ctx, c.SourceVM, script)
	}, facts: func() map[string]string {
		return map[string]string{"loop": s.dev[0].Port, "created": fmt.Sprint(s.created), "mounted": fmt.Sprint(s.mounted)}
	}}
}

// attachAction attaches layer i's device (the loop device, or the mapper of the qube
// below) to the layer's qube.
func (e *Engine) attachAction(c *Chain, s *openState, i int) action {
	h, prev, what := c.Hops[i], c.SourceVM, "loop device"
	if i > 0 {
		prev, what = c.Hops[i-1].VM, "mapper "+c.Key
	}
	step := Step{"attach", h.VM, fmt.Sprintf("attach %s's %s to %s%s", prev, what, h.VM, roWord(c.ReadOnly))}
	return action{step: step, layer: i + 1, do: func(ctx context.Context) error {
		// qubesd finishes an attach whose client hung up, possibly after the rollback
		// detached: the device would stay attached and the layer below busy. So an
		// attach is not interrupted; a cancel takes effect when qubesd has answered
		// (the Admin API client's own timeout still bounds the wait).
		if err := e.Qubes.Attach(context.WithoutCancel(ctx), h.VM, s.dev[i], c.ReadOnly); err != nil {
			return err
		}
		atts, err := e.Qubes.Attached(ctx, h.VM)
		if err != nil {
			return err
		}
		for _, a := range atts {
			if a.DeviceRef == s.dev[i] && a.FrontendDev != "" {
				s.feDev[i] = a.FrontendDev
				return nil
			}
		}
		return fmt.Errorf("qubesd does not show %s attached to %s", s.dev[i], h.VM)
	}, undo: func(ctx context.Context) error {
		if s.dev[i].Port == "" {
			return nil
		}
		return e.detachIfAlive(ctx, h.VM, s.dev[i])
	}, facts: func() map[string]string {
		return map[string]string{"device": s.dev[i].String(), "frontend_dev": s.feDev[i]}
	}}
}

// decryptAction opens layer i in its qube (injecting its key when given), checks its
// cipher, and mounts the plaintext on the last layer.
func (e *Engine) decryptAction(c *Chain, o OpenOptions, s *openState, i int, keys [][]byte) action {
	h := c.Hops[i]
	d := "decrypt layer " + fmt.Sprint(i+1) + " as " + c.Key
	if h.Inject != "" {
		d = "inject key " + h.Inject + " if missing, " + d
	} else if len(o.InjectKeys[h.VM]) > 0 {
		d = "inject the given key if missing, " + d
	} else if store := o.InjectStores[h.VM]; store != "" {
		d = "inject the key from key store " + store + " if missing, " + d
	}
	if i == len(c.Hops)-1 && c.MountPoint != "" {
		d += ", mount the plaintext on " + c.MountPoint + " with " + c.mountOptions() + roWord(c.ReadOnly)
	}
	return action{step: Step{"decrypt", h.VM, d}, layer: i + 1, do: func(ctx context.Context) error {
		user, err := e.user(ctx, h.VM)
		if err != nil {
			return err
		}
		last := i == len(c.Hops)-1
		ho := hopOpen{key: keyPath(user, c.Key), name: c.Key, dev: "/dev/" + s.feDev[i], options: c.CryptArgs(i, "open"),
			ciphers: kernelSpellings(c.ciphersOf(i)), readOnly: c.ReadOnly, injectLen: len(keys[i]), printDM: !last}
		if last {
			ho.mountPoint, ho.mountOptions = c.MountPoint, c.mountOptions()
		}
		var input io.Reader
		if len(keys[i]) > 0 {
			input = strings.NewReader(string(keys[i]))
		}
		res, err := e.run(ctx, h.VM, hopOpenScript(ho), input)
		if err != nil {
			return err
		}
		if res.ExitCode != 0 && res.ExitCode != exitCipher {
			return errors.New(scriptError(res.ExitCode))
		}
		var segs []Segment
		m := hopOutRE.FindSubmatch(res.Stdout)
		ok := m != nil
		if ok {
			segs, ok = parseSegments(string(m[1]))
		}
		if !ok || (len(m[2]) > 0) != (res.ExitCode == 0 && !last) {
			return fmt.Errorf("%w: layer output %q", ErrSpoofed, qubes.Printable(string(res.Stdout), 80))
		}
		// The qube checked; so does dom0, with its own list.
		if err := checkCiphers(i+1, segs, c.ciphersOf(i)); err != nil || res.ExitCode == exitCipher {
			if err == nil {
				err = fmt.Errorf("%w: layer %d (the qube refused it)", ErrCipherRefused, i+1)
			}
			return err
		}
		if last {
			return nil
		}
		s.dev[i+1] = qubes.DeviceRef{Backend: h.VM, Port: string(m[2])}
		return e.checkExposed(ctx, s.dev[i+1], c.Key)
	}, undo: func(ctx context.Context) error {
		return e.runOK(ctx, h.VM, hopCloseScript(c.Key, ""))
	}, facts: func() map[string]string {
		if i+1 < len(s.dev) {
			return map[string]string{"dm": s.dev[i+1].Port}
		}
		return nil
	}}
}

func hasOption(opts []string, name string) bool {
	for _, o := range opts {
		if o == name {
			return true
		}
	}
	return false
}

// checkExposed confirms through qubesd that a device a qube named exists there; for a
// mapper the description qubesd relays must be the key id (a tripwire: the qube writes
// it, but a qube lying about the dm device gets caught unless it lies twice).
func (e *Engine) checkExposed(ctx context.Context, dev qubes.DeviceRef, mapper string) error {
	devs, err := e.Qubes.Available(ctx, dev.Backend)
	if err != nil {
		return err
	}
	for _, d := range devs {
		if d.Port != dev.Port {
			continue
		}
		if mapper != "" && normDesc(d.Description) != normDesc(mapper) {
			return fmt.Errorf("%w: %s is described as %q, not %q", ErrSpoofed, dev, qubes.Printable(d.Description, 80), mapper)
		}
		return nil
	}
	return fmt.Errorf("%w: %s", ErrSpoofed, dev)
}

// normDesc compares descriptions across dialects (R4.3 shows '_' as ' ').
func normDesc(s string) string { return strings.TrimSpace(strings.ReplaceAll(s, "_", " ")) }

func (e *Engine) runOK(ctx context.Context, vm, script string) error {
	res, err := e.run(ctx, vm, script, nil)
	if err != nil {
		return err
	}
	if res.ExitCode != 0 {
		return errors.New(scriptError(res.ExitCode))
	}
	return nil
}

// detachIfAlive detaches unless the backend or the frontend is down: detaching from a
// dead peer wedges qubesd (Qubes #4784), and a halted frontend has nothing attached.
func (e *Engine) detachIfAlive(ctx context.Context, frontend string, dev qubes.DeviceRef) error {
	states, err := e.states(ctx)
	if err != nil {
		return err
	}
	if !qubes.IsRunning(states[dev.Backend]) || !qubes.IsRunning(states[frontend]) {
		e.log().WithFields(logrus.Fields{"vm": frontend, "device": dev.String()}).Info("not detaching: a peer is down (Qubes #4784)")
		return nil
	}
	err = e.Qubes.Detach(ctx, frontend, dev)
	if errors.Is(err, qubes.ErrNotAttached) {
		return nil
	}
	return err
}

// injectedKey reads the key a chain file injects into hop h: from a dom0 key file, or
// from the blib key store (ErrKeystoreLocked while it is locked).
func (e *Engine) injectedKey(ctx context.Context, c *Chain, h Hop) ([]byte, error) {
	dir, isStore, err := ParseKeystoreRef(h.Inject)
	switch {
	case err != nil:
		return nil, err
	case isStore:
		return e.KeystoreKey(ctx, Keystore{Dir: dir}, h.VM, c.Key)
	}
	return readInjectedKey(h.Inject)
}

// readInjectedKey reads a dom0 key file for injection.
func readInjectedKey(p string) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, fmt.Errorf("cannot read key to inject: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() || st.Size() == 0 || st.Size() > 64<<10 {
		return nil, fmt.Errorf("cannot inject %s: not a regular file of 1 byte to 64 KiB", p)
	}
	return io.ReadAll(f)
}

// SourcePresent reports whether the chain's source device exists in the source qube
// (always true without a source device); only the exit code comes back.
func (e *Engine) SourcePresent(ctx context.Context, c *Chain) (bool, error) {
	if c.SourceDevice == "" {
		return true, nil
	}
	res, err := e.run(ctx, c.SourceVM, "[ -e "+q(c.SourceDevice)+" ] && exit 0; exit 1", nil)
	if err != nil {
		return false, err
	}
	return res.ExitCode == 0, nil
}
