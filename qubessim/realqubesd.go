package qubessim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
)

// With a real qubesd (../shared/real-qubesd: the Admin API server code of Qubes OS run
// without Xen) the Admin API is that server and the simulator plays the rest of a Qubes
// system: Xen (qubes run and stop, disks appear in frontends) and the qubes' agents
// (udev reports block devices to QubesDB, qrexec runs commands).
//
// The simulator follows the server's event stream and, on every event that may change a
// qube, reads the qube's power state and attachments back from the server and makes its
// own world match (level-triggered, so a missed or reordered event cannot leave the
// worlds apart). What runs in a qube changes its devices; they are reported after each
// command, as udev would, through the server's control socket.

// ErrRealQubesd refuses what needs the simulator's own Admin API server.
var ErrRealQubesd = errors.New("the Admin API is the real qubesd here (--real-qubesd); this needs the simulator's own server")

// barrierFeature is a dom0 feature the simulator sets to learn that it has seen every
// event the server sent before: the server's events are ordered, so when the change of
// this feature arrives, all earlier events have been mirrored. A qrexec call waits on a
// barrier first, so a qube that qubesd has just started, or a disk it has just
// attached, is there when the command runs.
const barrierFeature = "qubes-sim-barrier"

// Generous: the server runs in Python, maybe in a TCG guest, maybe on a loaded machine.
const (
	realReadyTimeout = 3 * time.Minute
	realCallTimeout  = 2 * time.Minute
	barrierTimeout   = 30 * time.Second
)

type realQubesd struct {
	s      *Sim
	srv    *RealServer
	log    io.Writer
	client *qubes.Client

	syncMu   sync.Mutex                          // one reconciliation at a time; guards the maps
	reported map[string]map[string]string        // qube -> port -> "SIZE MODE DESC" told to QubesDB
	stopping map[string]bool                     // a domain-pre-shutdown was seen: a clean halt
	stale    map[string][]qubes.DeviceRef        // frontend -> disks qubesd wrongly kept over a restart
	stopped  map[string]map[qubes.DeviceRef]bool // frontend -> the disks it had when it stopped
	shown    map[string]map[qubes.DeviceRef]bool // frontend -> disks attached since its start (events)

	bmu   sync.Mutex
	bcond *sync.Cond
	sent  int64 // last barrier value set
	seen  int64 // highest barrier value seen in the event stream

	cancel context.CancelFunc
	done   chan struct{}
}

func startRealQubesd(s *Sim, dir string, log io.Writer) (*realQubesd, error) {
	if _, err := os.Stat(filepath.Join(dir, "start.sh")); err != nil {
		return nil, fmt.Errorf("cannot use the real qubesd in %s: %w", dir, err)
	}
	r := &realQubesd{
		s: s, log: log, client: qubes.NewClient(s.cfg.Socket),
		srv:      &RealServer{Dir: dir, Version: s.cfg.Dialect, Socket: s.cfg.Socket, State: filepath.Join(s.cfg.Dir, "real-qubesd"), Log: log},
		reported: map[string]map[string]string{}, stopping: map[string]bool{}, stale: map[string][]qubes.DeviceRef{},
		stopped: map[string]map[qubes.DeviceRef]bool{}, shown: map[string]map[qubes.DeviceRef]bool{},
		done: make(chan struct{}),
	}
	r.bcond = sync.NewCond(&r.bmu)
	r.client.SetTimeout(realCallTimeout)
	if err := os.MkdirAll(r.srv.State, 0o755); err != nil {
		return nil, err
	}
	if err := r.srv.Start(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	if err := r.syncAll(ctx); err != nil {
		cancel()
		r.srv.Stop()
		return nil, err
	}
	go r.follow(ctx)
	return r, nil
}

// restart is `systemctl restart qubesd`: the qubes keep running, event subscribers are
// cut off and reconnect.
func (r *realQubesd) restart() error {
	r.srv.Stop()
	return r.srv.Start()
}

func (r *realQubesd) close() {
	r.cancel()
	<-r.done
	r.srv.Stop()
}

// follow mirrors the server's events until close.
func (r *realQubesd) follow(ctx context.Context) {
	defer close(r.done)
	for ev := range r.client.Events(ctx, qubes.Backoff{Min: 50 * time.Millisecond, Max: time.Second}) {
		switch {
		case ev.Kind == qubes.EventResync:
			// Events were lost while the stream was down, barriers' among them: a
			// barrier begun before this full read is answered by it.
			r.bmu.Lock()
			begun := r.sent
			r.bmu.Unlock()
			err := r.syncAll(ctx)
			r.logErr(err)
			if err == nil {
				r.passBarriers(begun)
			}
		case ev.Name == "domain-add":
			r.logErr(r.syncAll(ctx))
		case ev.Kind == qubes.EventDomainPreShutdown:
			r.syncMu.Lock()
			r.stopping[ev.Subject] = true
			r.syncMu.Unlock()
		case ev.Kind == qubes.EventDeviceAttach, ev.Kind == qubes.EventDeviceDetach:
			r.syncMu.Lock()
			if r.shown[ev.Subject] == nil {
				r.shown[ev.Subject] = map[qubes.DeviceRef]bool{}
			}
			r.shown[ev.Subject][ev.Device] = ev.Kind == qubes.EventDeviceAttach
			r.syncMu.Unlock()
			r.logErr(r.syncVM(ctx, ev.Subject))
		case ev.Kind == qubes.EventDomainStart, ev.Kind == qubes.EventDomainUnpaused, ev.Kind == qubes.EventDomainPaused,
			ev.Kind == qubes.EventDomainShutdown:
			r.logErr(r.syncVM(ctx, ev.Subject))
		case ev.Subject == "dom0" && ev.Name == "domain-feature-set:"+barrierFeature:
			n, _ := strconv.ParseInt(ev.Args["value"], 10, 64)
			r.passBarriers(n)
		}
	}
}

// passBarriers releases the barriers up to n.
func (r *realQubesd) passBarriers(n int64) {
	r.bmu.Lock()
	r.seen = max(r.seen, n)
	r.bcond.Broadcast()
	r.bmu.Unlock()
}

func (r *realQubesd) logErr(err error) {
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(r.log, "qubes-sim:", err)
	}
}

// barrier returns once every event the server sent before the call has been mirrored
// (or after barrierTimeout, when the server is away).
func (r *realQubesd) barrier() {
	r.bmu.Lock()
	r.sent++
	n := r.sent
	r.bmu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), barrierTimeout)
	defer cancel()
	if _, err := r.client.Call(ctx, qubes.Request{Method: "admin.vm.feature.Set", Dest: "dom0", Arg: barrierFeature,
		Payload: []byte(strconv.FormatInt(n, 10))}); err != nil {
		r.logErr(fmt.Errorf("cannot set the event barrier: %w", err))
		return
	}
	stop := context.AfterFunc(ctx, func() {
		r.bmu.Lock()
		r.bcond.Broadcast()
		r.bmu.Unlock()
	})
	defer stop()
	r.bmu.Lock()
	for r.seen < n && ctx.Err() == nil {
		r.bcond.Wait()
	}
	r.bmu.Unlock()
	if ctx.Err() != nil {
		r.logErr(errors.New("the event barrier timed out"))
	}
}

// syncAll learns new qubes and mirrors every qube.
func (r *realQubesd) syncAll(ctx context.Context) error {
	vms, err := r.client.ListVMs(ctx)
	if err != nil {
		return fmt.Errorf("cannot list the real qubesd's qubes: %w", err)
	}
	for _, v := range vms {
		if _, ok := r.s.World.VM(v.Name); ok {
			continue
		}
		user, err := r.client.DefaultUser(ctx, v.Name)
		if err != nil {
			user = "user"
		}
		if _, err := r.s.AddVM(v.Name, v.Class, user); err != nil {
			return err
		}
	}
	for _, v := range vms {
		if err := r.syncVM(ctx, v.Name); err != nil {
			return err
		}
	}
	return nil
}

// syncVM makes the simulated qube match the server's: its power state and the disks
// attached to it.
func (r *realQubesd) syncVM(ctx context.Context, name string) error {
	if name == "dom0" || name == "" {
		return nil
	}
	r.syncMu.Lock()
	defer r.syncMu.Unlock()
	state, err := r.client.CurrentState(ctx, name)
	if err != nil {
		return fmt.Errorf("cannot read the state of %s: %w", name, err)
	}
	var atts []qubes.Attachment
	up := state == qubes.StateRunning || state == qubes.StatePaused
	if up {
		if atts, err = r.client.Attached(ctx, name); err != nil {
			return fmt.Errorf("cannot read the disks of %s: %w", name, err)
		}
	}
	w := r.s.World
	w.mu.Lock()
	vm, ok := w.vms[name]
	if ok && up && vm.State == qubes.StateHalted && len(r.stopped[name]) > 0 {
		// A qube Xen has just booted has no hot-plugged disks. The real-qubesd stand-in
		// for Xen keeps the disks a qube had when it stopped and shows them again after
		// its next start (serve.py forgets them only when asked while the qube is
		// down); take them away as a fresh domain would not have them.
		// R4.2 cannot detach a device its backend no longer has (UnknownDevice): such
		// a disk is detached once the backend has a device of that name again,
		// before anyone hears of that device (see reportLocked).
		// Only the disks it had when it stopped: one attached since the start is real.
		w.mu.Unlock()
		r.stale[name] = nil
		var fresh []qubes.Attachment
		for _, a := range atts {
			if !r.stopped[name][a.DeviceRef] {
				fresh = append(fresh, a)
				continue
			}
			fmt.Fprintf(r.log, "qubes-sim: qubesd kept %s attached to %s over its restart (an artifact of real-qubesd's Xen stand-in): detaching\n", a.DeviceRef, name)
			if err := r.client.Detach(ctx, name, a.DeviceRef); err != nil {
				r.stale[name] = append(r.stale[name], a.DeviceRef)
			}
		}
		atts = fresh
		delete(r.stopped, name)
		w.mu.Lock()
		vm, ok = w.vms[name]
	}
	if !ok {
		w.mu.Unlock()
		return nil
	}
	booted, halted := false, false
	switch {
	case up:
		if vm.State == qubes.StateHalted {
			if err := w.boot(vm); err != nil {
				w.mu.Unlock()
				return fmt.Errorf("cannot run %s: %w", name, err)
			}
			booted = true
		}
		vm.State = state
		r.applyAttachments(vm, atts)
	case state == qubes.StateHalted || state == qubes.StateCrashed || state == qubes.StateDying:
		if vm.running() {
			// What qubesd attached (its events), whether or not the simulator could
			// give each disk to the qube.
			r.stopped[name] = r.shown[name]
			w.powerOff(vm, r.stopping[name])
			halted = true
		}
		delete(r.shown, name)
		delete(r.stopping, name)
	}
	w.mu.Unlock()
	if booted || halted {
		// A qube's QubesDB starts empty; the server's stand-in keeps it over a restart.
		delete(r.reported, name)
		if err := r.srv.Ctl("qdb-rm " + name + " /qubes-block-devices/"); err != nil {
			return err
		}
	}
	if booted {
		return r.reportLocked()
	}
	return nil
}

// applyAttachments gives vm exactly the disks the server has attached to it. w.mu held.
func (r *realQubesd) applyAttachments(vm *VM, atts []qubes.Attachment) {
	w := r.s.World
	want := map[qubes.DeviceRef]qubes.Attachment{}
	for _, a := range atts {
		want[a.DeviceRef] = a
	}
	for _, a := range w.attachmentsOf(vm.Name) {
		if _, ok := want[a.DeviceRef]; ok {
			delete(want, a.DeviceRef)
			continue
		}
		if err := w.disconnect(a); err != nil {
			fmt.Fprintf(r.log, "qubes-sim: cannot take %s from %s: %v\n", a.DeviceRef, vm.Name, err)
		}
	}
	refs := make([]qubes.DeviceRef, 0, len(want))
	for ref := range want {
		refs = append(refs, ref)
	}
	sort.Slice(refs, func(i, j int) bool { return refs[i].String() < refs[j].String() })
	for _, ref := range refs {
		a := want[ref]
		be, ok := w.vms[ref.Backend]
		var dev devInfo
		found := false
		if ok && be.running() {
			for _, d := range w.published(be) {
				if d.name == ref.Port {
					dev, found = d, true
				}
			}
		}
		if !found || a.FrontendDev == "" {
			fmt.Fprintf(r.log, "qubes-sim: qubesd attached %s to %s, which the simulated backend does not have\n", ref, vm.Name)
			continue
		}
		att := &Attachment{DeviceRef: ref, Frontend: vm.Name, ReadOnly: a.ReadOnly, FrontendDev: a.FrontendDev}
		if err := w.connect(att, dev); err != nil {
			fmt.Fprintf(r.log, "qubes-sim: cannot give %s to %s: %v\n", ref, vm.Name, err)
		}
	}
}
