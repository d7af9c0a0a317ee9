package daemon

import (
	"context"
	"sort"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubes"
)

// handleEvent reacts to one qubesd event (in the loop).
func (d *Daemon) handleEvent(ev qubes.Event) {
	vm := ev.Subject
	switch ev.Kind {
	case qubes.EventResync:
		d.log.Info("connected to qubesd: resynchronising")
		d.breakRecords("")
		d.resync()
	case qubes.EventDisconnected:
		d.breakRecords("")
		if d.connected {
			d.log.WithError(ev.Err).Warn("lost the qubesd event stream; reconnecting")
		}
		d.connected = false
		d.updateSummary()
	case qubes.EventDomainPreStart:
		d.started[vm] = time.Now()
	case qubes.EventDomainStart:
		d.setVM(vm, qubes.StateRunning)
		d.started[vm] = time.Now()
		d.forChains(vm, func(cs *chainState) {
			d.consider(cs, dbusapi.Because(dbusapi.CauseQubeStarted, vm+" started"), mayOpen)
		})
	case qubes.EventDomainStartFailed:
		d.setVM(vm, qubes.StateHalted)
		d.log.WithFields(logrus.Fields{"vm": vm, "reason": qubes.Printable(ev.Args["reason"], 200)}).Warn("qube failed to start")
		d.forChains(vm, func(cs *chainState) {
			d.consider(cs, dbusapi.Because(dbusapi.CauseQubeFailed, vm+" failed to start"), mayOpen)
		})
	case qubes.EventDomainShutdown:
		d.setVM(vm, qubes.StateHalted)
		d.breakRecords(vm)
		delete(d.devices, vm)
		d.forChains(vm, func(cs *chainState) {
			if d.isOpenish(cs) {
				d.autoClose(cs, dbusapi.Because(dbusapi.CauseQubeShutDown, vm+" shut down"))
			} else {
				d.consider(cs, dbusapi.Because(dbusapi.CauseQubeShutDown, vm+" shut down"), mayOpen)
			}
		})
	case qubes.EventDomainPaused:
		if d.vms[vm] == qubes.StateHalted {
			return // created paused: part of a start
		}
		d.setVM(vm, qubes.StatePaused)
		d.forChains(vm, func(cs *chainState) {
			if cs.state == dbusapi.ChainOpen && vm != cs.c.Target() {
				d.chainLog(cs).WithField("vm", vm).Warn("a qube of an open chain is paused; its layer is unreachable until it is unpaused")
			}
		})
	case qubes.EventDomainUnpaused:
		// R4.2 sends domain-unpaused after domain-start as part of a start; only an
		// unpause of a qube seen paused is the user's, however soon after its start.
		prev := d.vms[vm]
		if prev == qubes.StateHalted || prev != qubes.StatePaused && time.Since(d.started[vm]) < d.qrexecWait {
			return // part of a start
		}
		d.setVM(vm, qubes.StateRunning)
		d.forChains(vm, func(cs *chainState) {
			if d.isOpenish(cs) && cs.running == nil {
				d.enqueue(d.newJob(dbusapi.OpCheck, cs, 0, true, dbusapi.Because(dbusapi.CauseQubeUnpaused, vm+" unpaused")))
			} else {
				d.consider(cs, dbusapi.Because(dbusapi.CauseQubeUnpaused, vm+" unpaused"), mayOpen)
			}
		})
	case qubes.EventDomainAdd:
		if _, known := d.vms[vm]; !known {
			d.setVM(vm, qubes.StateHalted) // a new qube is halted
		}
		d.forChains(vm, func(cs *chainState) {
			d.consider(cs, dbusapi.Because(dbusapi.CauseQubeCreated, vm+" created"), mayOpen)
		})
	case qubes.EventDomainDelete:
		delete(d.vms, vm)
		if d.eventSince != nil {
			d.eventSince[vm] = true
		}
		d.forChains(vm, func(cs *chainState) {
			d.consider(cs, dbusapi.Because(dbusapi.CauseQubeDeleted, vm+" deleted"), mayOpen)
		})
	case qubes.EventDeviceAdded:
		if ev.Device.Backend != "" {
			d.sourceDevicesChanged(ev.Device.Backend, true, false)
		}
	case qubes.EventDeviceRemoved:
		d.breakRecords(ev.Device.Backend)
		if ev.Device.Backend != "" {
			d.sourceDevicesChanged(ev.Device.Backend, false, true)
		}
	case qubes.EventDeviceListChange:
		if !d.newAPI {
			d.debounceList(vm)
		}
	}
}

// breakRecords ends qcryptd's continuous record of every chain vm is part of (of every
// chain for ""): its next close reads the chain's facts first.
func (d *Daemon) breakRecords(vm string) {
	for _, cs := range d.chains {
		if vm == "" || cs.c.Involves(vm) {
			if cs.held {
				d.chainLog(cs).WithField("vm", vm).Debug("record broken: the next close reads the chain first")
			}
			cs.held = false
			cs.breaks++
		}
	}
}

// setVM records a qube's power state from an event.
func (d *Daemon) setVM(vm, state string) {
	d.vms[vm] = state
	if d.eventSince != nil {
		d.eventSince[vm] = true
	}
}

// forChains runs f for every chain the qube is part of.
func (d *Daemon) forChains(vm string, f func(cs *chainState)) {
	for _, name := range d.sortedNames() {
		if cs := d.chains[name]; cs.c.Involves(vm) {
			f(cs)
		}
	}
}

func (d *Daemon) isOpenish(cs *chainState) bool {
	return cs.state == dbusapi.ChainOpen || cs.state == dbusapi.ChainOpening || cs.state == dbusapi.ChainDegraded
}

// autoClose closes a chain because a qube or device went away. The engine never
// detaches from a qube that is down (Qubes #4784) and never shuts the target down.
func (d *Daemon) autoClose(cs *chainState, reason dbusapi.Reason) {
	if wanted(cs, dbusapi.OpClose) {
		return
	}
	d.enqueue(d.newJob(dbusapi.OpClose, cs, 0, true, reason))
}

// resync rebuilds the picture after (re)connecting: qubes, then every chain's state
// from the journal and live facts, then opens what is eligible.
func (d *Daemon) resync() {
	d.resyncGen++
	gen := d.resyncGen
	d.eventSince = map[string]bool{}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		vms, err := d.o.Qubes.ListVMs(ctx)
		api, aerr := d.o.Qubes.DeviceAPI(ctx)
		wait, werr := d.o.Qubes.DefaultQrexecTimeout(ctx)
		d.post(func() {
			if gen != d.resyncGen {
				return // a newer connection's resync does the work
			}
			if err != nil || aerr != nil {
				d.log.WithError(err).WithField("device_api_error", aerr).Error("cannot read the qubes after connecting; waiting for the next connection")
				return
			}
			d.connected = true
			d.newAPI = api == qubes.DeviceAPINew
			if werr == nil && wait > 0 {
				d.qrexecWait = time.Duration(wait) * time.Second
			}
			listed := map[string]string{}
			for _, vm := range vms {
				listed[vm.Name] = vm.State
			}
			for vm := range d.eventSince {
				// An event after the listing began is newer (a deleted qube: gone).
				if st, ok := d.vms[vm]; ok {
					listed[vm] = st
				} else {
					delete(listed, vm)
				}
			}
			d.vms, d.eventSince = listed, nil
			d.log.WithFields(logrus.Fields{"qubes": len(vms), "device_api": api.String()}).Info("qubes listed")
			d.updateSummary()
			for _, name := range d.sortedNames() {
				cs := d.chains[name]
				if cs.running == nil && cs.pending == nil {
					d.enqueue(d.newJob(dbusapi.OpReconcile, cs, 0, true, dbusapi.Because(dbusapi.CauseQubesd, "qubesd connection (re)established")))
				} else {
					cs.missedResync = true
				}
			}
		})
	}()
}

// considering is whether consider may open the chain or only says what it waits for.
type considering bool

const (
	mayOpen  considering = true
	waitOnly considering = false
)

// consider updates what a closed chain waits for and, with mayOpen, opens it when eligible.
func (d *Daemon) consider(cs *chainState, reason dbusapi.Reason, how considering) {
	if how == mayOpen && (cs.running != nil && cs.running.op == dbusapi.OpClose || cs.pending != nil && cs.pending.op == dbusapi.OpClose) {
		cs.trigger = reason
	}
	if !cs.managed || cs.removed || d.stopping || d.shuttingDown || !d.connected || cs.running != nil || cs.pending != nil {
		return
	}
	switch cs.state {
	case dbusapi.ChainDegraded:
		if how == mayOpen && reason.Cause == dbusapi.CauseQubeStarted {
			// A close that failed because a qube went down under it (or stopped and
			// started again) left the chain degraded. A qube that just started holds
			// none of its layers: look again; the check closes what is left, and a
			// closed chain opens as any other.
			d.enqueue(d.newJob(dbusapi.OpCheck, cs, 0, true, reason))
		}
		return
	case dbusapi.ChainOpen, dbusapi.ChainOpening, dbusapi.ChainClosing:
		return
	}
	if wait := d.waitingFor(cs); wait != "" {
		d.setState(cs, dbusapi.ChainWaiting, wait, reason)
		return
	}
	if how == waitOnly {
		return
	}
	if next := cs.lastAttempt.Add(cs.c.StartupInterval); !cs.lastAttempt.IsZero() && time.Now().Before(next) {
		d.scheduleRetry(cs, next)
		return
	}
	if reason.Cause == "" {
		reason = dbusapi.Because(dbusapi.CauseEligible, "eligible")
	}
	d.enqueue(d.newJob(dbusapi.OpOpen, cs, 0, true, reason))
}

// waitingFor says which qube an automatic open waits for ("" = none). With autostart
// the daemon starts qubes itself; without, the source and the target must run
// (intermediates are always started).
func (d *Daemon) waitingFor(cs *chainState) string {
	c := cs.c
	for _, vm := range c.VMs() {
		st, ok := d.vms[vm]
		switch {
		case !ok:
			return "waiting for " + vm + " (no such qube)"
		case st == qubes.StatePaused:
			return "waiting for " + vm + " (paused)"
		case st == qubes.StateHalting || st == qubes.StateDying:
			return "waiting for " + vm + " (shutting down)"
		}
	}
	if other := d.mapperHeldBy(cs.c); other != "" {
		return "waiting for " + other
	}
	if c.Autostart {
		return ""
	}
	for _, vm := range []string{c.SourceVM, c.Target()} {
		if !qubes.IsRunning(d.vms[vm]) {
			return "waiting for " + vm
		}
	}
	return ""
}

// scheduleRetry shows a failed chain's next attempt and evaluates it again then.
func (d *Daemon) scheduleRetry(cs *chainState, at time.Time) {
	if cs.retry != nil {
		cs.retry.Stop()
	}
	cs.retryAt = at
	if cs.state != dbusapi.ChainFailed && cs.state != dbusapi.ChainWaiting {
		d.setState(cs, dbusapi.ChainFailed, "", dbusapi.Because(dbusapi.CauseStartupInterval, "startup interval"))
	} else {
		d.publish(cs, cs.state, dbusapi.Because(dbusapi.CauseStartupInterval, "retry scheduled"))
	}
	cs.retry = time.AfterFunc(time.Until(at), func() {
		d.post(func() {
			cs.retryAt = time.Time{}
			cs.lastAttempt = time.Time{}
			d.consider(cs, dbusapi.Because(dbusapi.CauseRetry, "retry"), mayOpen)
		})
	})
}

// debounceList handles R4.2's device-list-change: after a quiet moment, re-list the
// backend's devices and diff with the last list.
func (d *Daemon) debounceList(vm string) {
	if t := d.debounce[vm]; t != nil {
		t.Stop()
	}
	d.debounce[vm] = time.AfterFunc(d.o.Debounce, func() {
		d.post(func() {
			delete(d.debounce, vm)
			d.relist(vm)
		})
	})
}

func (d *Daemon) relist(vm string) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		devs, err := d.o.Qubes.Available(ctx, vm)
		d.post(func() {
			if err != nil {
				d.log.WithField("vm", vm).WithError(err).Warn("cannot list block devices")
				return
			}
			var ports []string
			for _, dev := range devs {
				ports = append(ports, dev.Port)
			}
			sort.Strings(ports)
			added, removed := diff(d.devices[vm], ports)
			d.devices[vm] = ports
			if added || removed {
				d.sourceDevicesChanged(vm, added, removed)
			}
		})
	}()
}

func diff(old, cur []string) (added, removed bool) {
	o := map[string]bool{}
	for _, p := range old {
		o[p] = true
	}
	c := map[string]bool{}
	for _, p := range cur {
		c[p] = true
		added = added || !o[p]
	}
	for _, p := range old {
		removed = removed || !c[p]
	}
	return added, removed
}

// sourceDevicesChanged: a device appeared in a source qube (open its chains that wait
// for a device) or went away (check its open chains that sit on a source device: a
// chain of a container in the qube's own storage loses its loop device only to qcrypt,
// and checking every such chain at every close made 50 chains O(n²) in qrexec calls).
func (d *Daemon) sourceDevicesChanged(vm string, added, removed bool) {
	for _, name := range d.sortedNames() {
		cs := d.chains[name]
		if cs.c.SourceVM != vm {
			continue
		}
		switch {
		case removed && cs.c.SourceDevice != "" && cs.state == dbusapi.ChainOpen && cs.running == nil:
			d.enqueue(d.newJob(dbusapi.OpCheck, cs, 0, true, dbusapi.Because(dbusapi.CauseDeviceGone, "a device of "+vm+" went away")))
		case added && cs.c.SourceDevice != "":
			d.consider(cs, dbusapi.Because(dbusapi.CauseDeviceAppeared, "a device appeared in "+vm), mayOpen)
		}
	}
}
