package qubessim

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
)

// start boots a halted qube with the event sequence of qubesd; a running qube is a
// successful no-op, and a qube that is starting is waited for first (qubesd's
// startup_lock). It releases the lock while the qube "boots".
func (w *World) start(name string) error {
	w.mu.Lock()
	vm, ok := w.vms[name]
	if !ok {
		w.mu.Unlock()
		return excVMNotFound(name)
	}
	if vm.booting != nil {
		wait := vm.booting
		w.mu.Unlock()
		<-wait
		return w.start(name)
	}
	if vm.State != qubes.StateHalted {
		w.mu.Unlock()
		return nil
	}
	booting := make(chan struct{})
	vm.booting = booting
	defer func() {
		w.mu.Lock()
		vm.booting = nil
		w.mu.Unlock()
		close(booting)
	}()
	if f := w.qrexec[name]; f.StartFail != "" {
		w.emit(name, "domain-pre-start", "start_guid", "True", "mem_required", "None")
		w.emit(name, "domain-start-failed", "reason", f.StartFail)
		w.mu.Unlock()
		return &exception{"QubesException", "Start failed: " + f.StartFail}
	}
	w.emit(name, "domain-pre-start", "start_guid", "True", "mem_required", "None")
	w.emit(name, "domain-pre-spawn", "start_guid", "True")
	for _, p := range []string{"xid", "stubdom_xid", "start_time"} {
		w.emit(name, "property-reset:"+p, "name", p)
	}
	vm.State = qubes.StateTransient
	if err := w.boot(vm); err != nil {
		vm.State = qubes.StateHalted
		w.emit(name, "domain-start-failed", "reason", err.Error())
		w.mu.Unlock()
		return &exception{"QubesException", "Start failed: " + err.Error()}
	}
	w.emit(name, "domain-spawn", "start_guid", "True")
	delay := w.StartDelay
	w.mu.Unlock()

	time.Sleep(delay)

	w.mu.Lock()
	defer w.mu.Unlock()
	if vm.State != qubes.StateTransient {
		return &exception{"QubesVMError", fmt.Sprintf("Cannot connect to qrexec agent for %d seconds, see /var/log/xen/console/guest-%s.log for details", vm.QrexecTimeout, name)}
	}
	vm.State = qubes.StateRunning
	if w.dialect == R43 {
		w.emit(name, "domain-pre-unpaused")
		w.emit(name, "domain-unpaused")
		w.emit(name, "domain-start", "start_guid", "True")
	} else {
		w.emit(name, "domain-start", "start_guid", "True")
		w.emit(name, "domain-unpaused")
	}
	return nil
}

// boot gives a starting qube its fresh root and, on the kernel backend, its namespaces.
func (w *World) boot(vm *VM) error {
	if err := resetRoot(vm); err != nil {
		return err
	}
	if err := w.backend.boot(vm); err != nil {
		return err
	}
	if w.rq != nil {
		if err := w.rq.start(vm); err != nil {
			w.backend.teardown(vm, false)
			return err
		}
	}
	return nil
}

// resetRoot gives a booting qube a fresh root: like a template-based AppVM, only /home
// and /rw survive a reboot.
func resetRoot(vm *VM) error {
	ents, _ := os.ReadDir(vm.root)
	for _, e := range ents {
		if e.Name() != "home" && e.Name() != "rw" {
			os.RemoveAll(filepath.Join(vm.root, e.Name()))
		}
	}
	for _, d := range []string{"tmp", "mnt", "root"} {
		if err := os.MkdirAll(filepath.Join(vm.root, d), 0o755); err != nil {
			return fmt.Errorf("cannot reset the root of %s: %w", vm.Name, err)
		}
	}
	return nil
}

func (w *World) shutdown(name, arg string) error {
	force, wait := false, false
	if arg != "" {
		for _, a := range strings.Split(arg, "+") {
			switch a {
			case "force":
				force = true
			case "wait":
				wait = true
			default:
				return errEmpty // PermissionDenied on R4.1–R4.3
			}
		}
	}
	w.mu.Lock()
	vm, ok := w.vms[name]
	if !ok {
		w.mu.Unlock()
		return excVMNotFound(name)
	}
	switch {
	case vm.State == qubes.StateHalted:
		w.mu.Unlock()
		return &exception{"QubesVMNotStartedError", "Domain is powered off: " + quoteName(name)}
	case vm.State == qubes.StatePaused && w.dialect == R43 && !force:
		w.mu.Unlock()
		return &exception{"QubesVMNotRunningError", "Domain is paused: " + quoteName(name)}
	case vm.Name == "dom0":
		w.mu.Unlock()
		return errEmpty
	}
	halted := vm.halted
	if vm.State != qubes.StateHalting {
		w.emit(name, "domain-pre-shutdown", "force", pyBool(force))
		vm.State = qubes.StateHalting
		delay := w.ShutdownDelay
		go func() {
			time.Sleep(delay)
			w.mu.Lock()
			defer w.mu.Unlock()
			if vm.State == qubes.StateHalting {
				w.powerOff(vm, true)
			}
		}()
	}
	w.mu.Unlock()
	if wait {
		<-halted
	}
	return nil
}

func (w *World) kill(name string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	vm, ok := w.vms[name]
	if !ok {
		return excVMNotFound(name)
	}
	if !vm.running() || vm.Name == "dom0" {
		return &exception{"QubesVMNotStartedError", "Domain is powered off: " + quoteName(name)}
	}
	w.powerOff(vm, false)
	return nil
}

// powerOff ends a qube: processes die, its kernel state goes (written back when clean),
// attachments to it vanish, attachments from it go stale. R4.2 sends no device events
// for any of this; R4.3 reports removed ports and detaches.
func (w *World) powerOff(vm *VM, clean bool) {
	if w.rq != nil {
		w.rq.stopVM(vm)
	}
	for cmd := range vm.procs {
		killGroup(cmd)
	}
	w.backend.teardown(vm, clean)
	how := "shut down"
	if !clean {
		how = "killed"
	}
	w.logf("%s %s", vm.Name, how)
	for _, a := range append([]*Attachment(nil), w.attachments...) {
		switch {
		case a.Frontend == vm.Name:
			w.removeAttachment(a)
			if w.dialect == R43 {
				w.detachEvents(a)
			}
		case a.Backend == vm.Name:
			a.Stale = true
			w.logf("%s %s while %s had its %s attached: a layer taken from under a running qube", vm.Name, how, a.Frontend, a.Port)
		}
	}
	vm.State = qubes.StateHalted
	close(vm.halted)
	vm.halted = make(chan struct{})
	w.emit(vm.Name, "domain-stopped")
	for _, p := range []string{"xid", "stubdom_xid", "start_time"} {
		w.emit(vm.Name, "property-reset:"+p, "name", p)
	}
	w.emit(vm.Name, "domain-shutdown")
	if w.dialect == R43 {
		// Its device cache is emptied: every device it had is announced as removed.
		for _, port := range sortedSet(vm.announced) {
			w.emit(vm.Name, "device-removed:block", "port", vm.Name+":"+port)
		}
		vm.announced = nil
	}
}

func (w *World) pause(name string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	vm, ok := w.vms[name]
	if !ok {
		return excVMNotFound(name)
	}
	if vm.State != qubes.StateRunning || vm.Name == "dom0" {
		return &exception{"QubesVMNotRunningError", "Domain not running (either powered off or paused): " + quoteName(name)}
	}
	if w.dialect == R43 {
		w.emit(name, "domain-pre-paused")
	}
	vm.State = qubes.StatePaused
	w.emit(name, "domain-paused")
	return nil
}

func (w *World) unpause(name string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	vm, ok := w.vms[name]
	if !ok {
		return excVMNotFound(name)
	}
	if vm.State != qubes.StatePaused {
		return &exception{"QubesVMNotPausedError", "Domain is not paused: " + quoteName(name)}
	}
	if w.dialect == R43 {
		w.emit(name, "domain-pre-unpaused")
	}
	vm.State = qubes.StateRunning
	w.emit(name, "domain-unpaused")
	return nil
}

func pyBool(b bool) string {
	if b {
		return "True"
	}
	return "False"
}

// attach implements admin.vm.device.block.Attach for both dialects.
func (w *World) attach(frontend string, dev qubes.DeviceRef, readOnly *bool) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	fe := w.vms[frontend]
	be, ok := w.vms[dev.Backend]
	if !ok {
		return errEmpty // KeyError in qubesd
	}
	if !fe.running() {
		if w.dialect == R43 {
			return &exception{"QubesVMNotRunningError", "VM not running, cannot attach device, do you mean `assign`?"}
		}
		return &exception{"QubesVMNotRunningError", "VM not running, can only attach device with persistent flag"}
	}
	if !be.running() {
		return &exception{"QubesVMNotRunningError", fmt.Sprintf("Domain %s needs to be running to attach device from it", be.Name)}
	}
	var b devInfo
	ok = false
	for _, d := range w.published(be) {
		if d.name == dev.Port {
			b, ok = d, true
		}
	}
	if !ok {
		return errEmpty // unknown device: AttributeError / ProtocolError in qubesd
	}
	if a := w.attachmentOf(dev); a != nil {
		if w.dialect == R43 {
			if a.Frontend == frontend {
				return &exception{"DeviceAlreadyAttached", fmt.Sprintf("'device %s:%s:%s of class block already attached to %s'", dev.Backend, dev.Port, w.deviceID(dev.Backend, dev.Port), frontend)}
			}
			return &exception{"DeviceAlreadyAttached", fmt.Sprintf("'Device %s:%s:%s already attached to %s'", dev.Backend, dev.Port, w.deviceID(dev.Backend, dev.Port), a.Frontend)}
		}
		if a.Frontend == frontend {
			return &exception{"DeviceAlreadyAttached", fmt.Sprintf("'device %s:%s of class block already attached to %s'", dev.Backend, dev.Port, frontend)}
		}
		// R4.2 lets libvirt fail on a disk that is in use elsewhere.
		return errEmpty
	}
	if frontend == dev.Backend {
		return errEmpty
	}
	ro := b.ro
	if readOnly != nil {
		ro = *readOnly
	}
	a := &Attachment{DeviceRef: dev, Frontend: frontend, ReadOnly: ro}
	// The block extension refuses in its pre-attach handler: the event is out first.
	w.attachEvents(a, true)
	if b.ro && !ro {
		return &exception{"QubesValueError", "This device can be attached only read-only"}
	}
	fdev, err := w.frontendDev(frontend)
	if err != nil {
		return errEmpty
	}
	a.FrontendDev = fdev
	if err := w.connect(a, b); err != nil {
		return &exception{"QubesException", "Device attach failed: " + err.Error()}
	}
	w.attachEvents(a, false)
	return nil
}

func (w *World) detach(frontend string, dev qubes.DeviceRef) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	var att *Attachment
	for _, a := range w.attachmentsOf(frontend) {
		// R4.3 matches by port only (qubes/devices.py detach).
		if a.Port == dev.Port && (w.dialect == R43 || a.Backend == dev.Backend) {
			att = a
			break
		}
	}
	if att == nil {
		if w.dialect == R43 {
			return &exception{"DeviceNotAssigned", fmt.Sprintf("'block device %s not attached to %s'", dev.Port, frontend)}
		}
		return &exception{"DeviceNotAttached", fmt.Sprintf("'device %s of class block not attached to %s'", dev.Port, frontend)}
	}
	if att.Stale && w.Bug4784 {
		// Qubes #4784: qubesd breaks until restarted.
		w.wedged = true
		return errEmpty
	}
	if err := w.disconnect(att); err != nil {
		// Xen refuses to detach a disk the frontend still uses.
		return errEmpty
	}
	w.detachEvents(att)
	return nil
}

// connect gives the frontend its disk over the backend's device b (Xen's part of an
// attach) and records the attachment.
func (w *World) connect(a *Attachment, b devInfo) error {
	if err := w.backend.attach(a, b); err != nil {
		return err
	}
	w.attachments = append(w.attachments, a)
	return nil
}

// disconnect takes the disk away from the frontend (Xen's part of a detach); it fails
// while the frontend still uses the disk.
func (w *World) disconnect(a *Attachment) error {
	if err := w.backend.detach(a); err != nil {
		return err
	}
	w.removeAttachment(a)
	return nil
}
