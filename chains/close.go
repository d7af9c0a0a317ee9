package chains

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/qcrypt/qcrypt/qubes"
)

// Closing is how qcryptd runs a close, beyond the options the user gave.
type Closing struct {
	// Held: qcryptd's own record of the chain is continuous since it opened or verified
	// it (no gap in its event stream, no qube of the chain shut down, no device of one
	// removed). The layout the journal recorded at the open is then the chain's
	// identity: the close goes straight to its steps, each checking in the same call
	// that what it takes down is where the record says; when one is not, the close
	// stops there and reads the chain's facts as an unheld close does.
	Held bool
	// BeforeSteps, when set, runs before the first step: qcryptd's pre close hook,
	// which a refused close or one with nothing to do must not run.
	BeforeSteps func(context.Context)
}

// Close closes a chain in reverse order (unmount and close each layer, detach, detach
// the loop device). It converges from any partial state and is idempotent: what is
// already gone is skipped, and a peer that is down is never detached from (Qubes
// #4784). With Force, an intermediate whose layer cannot be closed is shut down; the
// target only with ShutdownTarget. It never shuts anything down otherwise.
//
// A close with nothing to take down returns ErrNotOpen, one of another chain's parts
// ErrOtherChain; both touch nothing.
func (e *Engine) Close(ctx context.Context, c *Chain, o CloseOptions, how Closing, progress ProgressFunc) error {
	before := func(ctx context.Context) {
		if how.BeforeSteps != nil {
			how.BeforeSteps(ctx)
			how.BeforeSteps = nil // once, also when a held close stops and reads
		}
	}
	if how.Held {
		if l := e.recordedLayout(c); l != nil {
			before(ctx)
			err := e.execute(ctx, c, "close", e.closeActions(c, o, nil, l), progress)
			if !errors.Is(err, errNotAsRecorded) {
				return err
			}
			e.log().WithField("chain", c.Name).WithError(err).Warn("the chain is not as qcryptd recorded it: reading it before closing")
		}
	}
	// What is open must be this chain: a spec with another source, file or key, or a
	// part of a longer chain, would close or detach another chain's parts. When the
	// facts cannot be had (a qube unreachable) the close goes on: it converges.
	st, states, err := e.status(ctx, c)
	if err == nil {
		if st.Other != "" {
			return fmt.Errorf("cannot close %s: %w: %s", c.Name, ErrOtherChain, st.Other)
		}
		if !st.Open() {
			if err := e.openElsewhere(ctx, c, st); err != nil {
				return err
			}
		}
	}
	before(ctx)
	return e.execute(ctx, c, "close", e.closeActions(c, o, states, nil), progress)
}

// errNotAsRecorded stops a held close at a step whose part is not where the open
// recorded it; that step changed nothing.
var errNotAsRecorded = errors.New("not as the open recorded it")

// layout is where an open chain's parts are: per hop, the device it was given and that
// device's name in the hop (xvdi).
type layout struct {
	devs []qubes.DeviceRef
	fes  []string
}

// recordedLayout is c's layout as the journal recorded it: the last operation on c was
// an open that finished well, of these qubes, with each attachment's facts. nil when
// there is no such record.
func (e *Engine) recordedLayout(c *Chain) *layout {
	rec, err := e.Journal.Read(c.Name)
	if err != nil || rec == nil || rec.Op != "open" || !rec.Finished || rec.Error != "" {
		return nil
	}
	l := &layout{}
	prev := c.SourceVM
	for _, s := range rec.Steps {
		if s.Kind != "attach" {
			continue
		}
		i := len(l.devs)
		if i >= len(c.Hops) || s.VM != c.Hops[i].VM || s.State != "done" {
			return nil
		}
		backend, port, _ := strings.Cut(s.Facts["device"], ":")
		portRE := dmPortRE
		if i == 0 {
			portRE = loopPortRE
		}
		fe := s.Facts["frontend_dev"]
		if backend != prev || !portRE.MatchString(port) || !xvdRE.MatchString(fe) {
			return nil
		}
		l.devs, l.fes = append(l.devs, qubes.DeviceRef{Backend: backend, Port: port}), append(l.fes, fe)
		prev = s.VM
	}
	if len(l.devs) != len(c.Hops) {
		return nil
	}
	return l
}

// openElsewhere decides a close of a chain that is not whole: when its container is
// open as another chain (the chains share a beginning, or the source's loop device is
// attached elsewhere), the close would take that chain's parts, and is refused
// (ErrOtherChain, naming it); when nothing of it is open anywhere, it has nothing to do
// (ErrNotOpen). What is left is c partly open, or a loop device no chain uses: its
// own leftovers, which the close takes down.
func (e *Engine) openElsewhere(ctx context.Context, c *Chain, st *Status) error {
	if st.Source != SourceLoop {
		if !st.held() {
			return ErrNotOpen
		}
		return nil // no source to find another chain by; the destinations hold c's layers
	}
	found, err := e.Discover(ctx)
	if err != nil {
		return fmt.Errorf("cannot close %s: %s has a loop device of %s and which chain uses it is unknown: %w", c.Name, c.SourceVM, c.Container(), err)
	}
	for _, d := range found {
		if d.SourceVM == c.SourceVM && (d.File == c.Container() || d.File == "" && d.Key == c.Key) && !d.partOf(c) {
			return &openAsError{chain: c, as: d}
		}
	}
	return nil
}

// openAsError: the container of a close's spec is open as another chain.
type openAsError struct {
	chain *Chain
	as    Discovered
}

func (e *openAsError) Error() string {
	c := e.chain
	return fmt.Sprintf("cannot close %s: %s in %s is open as %s, not as %s: close that one",
		c.Name, c.Container(), c.SourceVM, e.as.Shape(), strings.Join(c.VMs(), " > "))
}

func (e *openAsError) Is(target error) bool { return target == ErrOtherChain }

// closeActions are the steps of a close; states is a listing of the qubes just taken
// (nil: none), used until a step needs a fresh one. With a layout (a held close) each
// hop's step first checks that the hop has the recorded device attached under the
// recorded name and that the mapper sits on it, and detaches the recorded device.
func (e *Engine) closeActions(c *Chain, o CloseOptions, states map[string]string, l *layout) []action {
	var acts []action
	// backing[i] is the frontend device hop i's mapper sat on, learned when closing it.
	backing := make([]string, len(c.Hops))
	// states is the latest list of qubes: taken fresh before every detach (never detach
	// from a qube that just went down, Qubes #4784), reused by the other steps.
	current := func(ctx context.Context, fresh bool) (map[string]string, error) {
		if states == nil || fresh {
			st, err := e.memberStates(ctx, c)
			if err != nil {
				return nil, err
			}
			states = st
		}
		return states, nil
	}
	for i := len(c.Hops) - 1; i >= 0; i-- {
		h := c.Hops[i]
		last := i == len(c.Hops)-1
		mayShutdown := o.Force && !last || o.ShutdownTarget && last
		prev := c.SourceVM
		if i > 0 {
			prev = c.Hops[i-1].VM
		}
		closeStep := Step{"close", h.VM, "unmount and close " + c.Key + " in " + h.VM}
		if mayShutdown {
			closeStep.Desc += "; if that fails, shut " + h.VM + " down"
		}
		acts = append(acts, action{step: closeStep, layer: i + 1, do: func(ctx context.Context) error {
			states, err := current(ctx, false)
			if err != nil {
				return err
			}
			if !qubes.IsRunning(states[h.VM]) {
				return nil
			}
			on := ""
			if l != nil {
				if err := e.attachedAsRecorded(ctx, h.VM, l.devs[i], l.fes[i]); err != nil {
					return err
				}
				on = "/dev/" + l.fes[i]
			}
			res, err := e.run(ctx, h.VM, hopCloseScript(c.Key, on), nil)
			if err == nil && res.ExitCode == exitNotAsRecorded {
				return fmt.Errorf("%w: %s has no %s on %s", errNotAsRecorded, h.VM, c.Key, on)
			}
			if err == nil && res.ExitCode == 0 {
				if m := xvdOutRE.FindSubmatch(res.Stdout); m != nil {
					backing[i] = string(m[1])
				}
				return nil
			}
			if err == nil {
				err = errors.New(scriptError(res.ExitCode))
			}
			if e.wentDown(ctx, c, h.VM) {
				return nil // its layer went down with it
			}
			if !mayShutdown {
				return err
			}
			e.log().WithFields(logrus.Fields{"chain": c.Name, "vm": h.VM}).WithError(err).Warn("cannot close the layer; shutting the qube down")
			return e.shutdown(ctx, h.VM)
		}})
		detachStep := Step{"detach", h.VM, "detach the device of " + prev + " (skipped if " + prev + " is down)"}
		acts = append(acts, action{step: detachStep, layer: i + 1, do: func(ctx context.Context) error {
			states, err := current(ctx, true)
			if err != nil {
				return err
			}
			if l != nil {
				err = e.detachRecorded(ctx, c, i, l.devs[i], states)
			} else {
				err = e.detachHop(ctx, c, i, backing[i], states)
			}
			if err != nil && e.wentDown(ctx, c, h.VM) {
				return nil // a halted qube has nothing attached
			}
			return err
		}})
	}
	srcStep := Step{"loop-detach", c.SourceVM, "detach the loop devices of " + c.Container() + " in " + c.SourceVM}
	if o.Eject && c.SourceDevice != "" {
		srcStep.Desc += ", unmount " + c.SourceMountPoint
	}
	acts = append(acts, action{step: srcStep, do: func(ctx context.Context) error {
		states, err := current(ctx, false)
		if err != nil {
			return err
		}
		if !qubes.IsRunning(states[c.SourceVM]) {
			return nil
		}
		err = e.runOK(ctx, c.SourceVM, sourceCloseScript(c, o.Eject, e.MachineID))
		if err != nil && e.wentDown(ctx, c, c.SourceVM) {
			return nil // its loop devices went down with it
		}
		return err
	}})
	return acts
}

// wentDown reports whether vm is no longer running after one of its steps failed: the
// step's work is then done (a halted qube has no mapper, loop device or attachment).
func (e *Engine) wentDown(ctx context.Context, c *Chain, vm string) bool {
	states, err := e.memberStates(ctx, c)
	return err == nil && !qubes.IsRunning(states[vm])
}

// attachedAsRecorded checks through qubesd that vm has dev attached as fe.
func (e *Engine) attachedAsRecorded(ctx context.Context, vm string, dev qubes.DeviceRef, fe string) error {
	atts, err := e.Qubes.Attached(ctx, vm)
	if err != nil {
		return err
	}
	for _, a := range atts {
		if a.DeviceRef == dev {
			if a.FrontendDev != fe {
				return fmt.Errorf("%w: %s has %s as %s, not %s", errNotAsRecorded, vm, dev, a.FrontendDev, fe)
			}
			return nil
		}
	}
	return fmt.Errorf("%w: %s does not have %s attached", errNotAsRecorded, vm, dev)
}

// detachRecorded detaches the device hop i was given at the open, unless hop i or the
// qube that serves it is down (Qubes #4784). states must be fresh.
func (e *Engine) detachRecorded(ctx context.Context, c *Chain, i int, dev qubes.DeviceRef, states map[string]string) error {
	h := c.Hops[i]
	if !qubes.IsRunning(states[h.VM]) {
		return nil
	}
	if !qubes.IsRunning(states[dev.Backend]) {
		e.log().WithFields(logrus.Fields{"chain": c.Name, "vm": h.VM}).Info("not detaching: " + dev.Backend + " is down (Qubes #4784)")
		return nil
	}
	if err := e.Qubes.Detach(ctx, h.VM, dev); err != nil && !errors.Is(err, qubes.ErrNotAttached) {
		return err
	}
	return nil
}

// detachHop detaches what hop i has attached from the previous qube of the chain. With
// several candidates, the one the mapper sat on (feDev) is ours; without that fact, a
// dm device whose description is the key id. states must be fresh.
func (e *Engine) detachHop(ctx context.Context, c *Chain, i int, feDev string, states map[string]string) error {
	h := c.Hops[i]
	prev := c.SourceVM
	if i > 0 {
		prev = c.Hops[i-1].VM
	}
	if !qubes.IsRunning(states[h.VM]) {
		return nil
	}
	if !qubes.IsRunning(states[prev]) {
		e.log().WithFields(logrus.Fields{"chain": c.Name, "vm": h.VM}).Info("not detaching: " + prev + " is down (Qubes #4784)")
		return nil
	}
	atts, err := e.Qubes.Attached(ctx, h.VM)
	if err != nil {
		return err
	}
	mine, err := ownAttachments(ctx, e.Qubes, c, i, hopAttachments(atts, prev, i == 0), feDev)
	if err != nil {
		return err
	}
	var errs []string
	for _, a := range mine {
		if err := e.Qubes.Detach(ctx, h.VM, a.DeviceRef); err != nil && !errors.Is(err, qubes.ErrNotAttached) {
			errs = append(errs, err.Error())
		}
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

// ownAttachments keeps, of the candidates hop i has attached from the previous qube,
// the chain's own: the one the mapper sat on (feDev) if known, else those whose
// description is the chain's (a loop: the container path; a dm device: the key id).
// Descriptions come from the qubes: good enough to tell chains apart, never used to
// decide what to decrypt.
func ownAttachments(ctx context.Context, lists availableLister, c *Chain, i int, cands []qubes.Attachment, feDev string) ([]qubes.Attachment, error) {
	if len(cands) == 0 {
		return nil, nil
	}
	for _, a := range cands {
		if feDev != "" && a.FrontendDev == feDev {
			return []qubes.Attachment{a}, nil
		}
	}
	want := c.Key
	if i == 0 {
		want = c.Container()
	}
	devs, err := lists.Available(ctx, cands[0].Backend)
	if err != nil {
		return nil, err
	}
	var out []qubes.Attachment
	for _, a := range cands {
		for _, d := range devs {
			if d.Port == a.Port && normDesc(d.Description) == normDesc(want) {
				out = append(out, a)
			}
		}
	}
	return out, nil
}

// availableLister lists a backend's block devices (Qubes, or deviceLists).
type availableLister interface {
	Available(ctx context.Context, backend string) ([]qubes.BlockDevice, error)
}

// deviceLists reads each qube's device listings once, for one status read of many
// chains.
type deviceLists struct {
	q         Qubes
	mu        sync.Mutex
	atts      map[string][]qubes.Attachment
	available map[string][]qubes.BlockDevice
}

// Attached is Qubes.Attached, once per qube.
func (l *deviceLists) Attached(ctx context.Context, vm string) ([]qubes.Attachment, error) {
	return once(l, &l.atts, vm, func() ([]qubes.Attachment, error) { return l.q.Attached(ctx, vm) })
}

// Available is Qubes.Available, once per backend.
func (l *deviceLists) Available(ctx context.Context, backend string) ([]qubes.BlockDevice, error) {
	return once(l, &l.available, backend, func() ([]qubes.BlockDevice, error) { return l.q.Available(ctx, backend) })
}

// once returns (*m)[key], fetching it the first time; failures are not kept.
func once[V any](l *deviceLists, m *map[string]V, key string, fetch func() (V, error)) (V, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if v, ok := (*m)[key]; ok {
		return v, nil
	}
	v, err := fetch()
	if err != nil {
		return v, err
	}
	if *m == nil {
		*m = map[string]V{}
	}
	(*m)[key] = v
	return v, nil
}

func (e *Engine) shutdown(ctx context.Context, vm string) error {
	if err := e.Qubes.Shutdown(ctx, vm, true, true); err != nil && !errors.Is(err, qubes.ErrNotRunning) {
		return fmt.Errorf("cannot shut down %s: %w", vm, err)
	}
	return nil
}
