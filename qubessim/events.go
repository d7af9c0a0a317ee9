// Events: what admin.Events subscribers hear, in qubesd's order.

package qubessim

import (
	"fmt"
	"sort"
	"strconv"

	"github.com/qcrypt/qcrypt/qubes"
)

// subscriber is one admin.Events connection; dest "" means all qubes and global events.
type subscriber struct {
	dest string
	ch   chan []byte
	gone chan struct{}
}

// emit sends an event record to every interested subscriber. A subscriber that cannot
// keep up is dropped, as a stuck client would be by qubesd's transport.
func (w *World) emit(subject, name string, args ...string) {
	rec := qubes.EncodeEvent(subject, name, args...)
	for s := range w.subs {
		if s.dest != "" && s.dest != subject {
			continue
		}
		select {
		case s.ch <- rec:
		default:
			w.dropSubscriber(s)
		}
	}
}

func (w *World) dropSubscriber(s *subscriber) {
	if _, ok := w.subs[s]; ok {
		delete(w.subs, s)
		close(s.gone)
	}
}

// DropEventStreams closes every admin.Events connection (fault injection).
func (w *World) DropEventStreams() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for s := range w.subs {
		w.dropSubscriber(s)
	}
}

// deviceID is the R4.3 device_id of a backend's port: a partition's (QubesDB has its
// parent) continues its parent's. w.mu held.
func (w *World) deviceID(backend, port string) string {
	if vm, ok := w.vms[backend]; ok && vm.running() {
		for _, d := range w.published(vm) {
			if d.name == port && d.parent != "" {
				return devID(d.parent) + devID(port)
			}
		}
	}
	return devID(port)
}

// devID is the R4.3 device_id of a block port: its trailing number, or None.
func devID(port string) string {
	i := len(port)
	for i > 0 && port[i-1] >= '0' && port[i-1] <= '9' {
		i--
	}
	if i == len(port) {
		return ":None"
	}
	n, _ := strconv.Atoi(port[i:])
	return ":" + strconv.Itoa(n)
}

// qdbChanged is what qubesd sends for one change under /qubes-block-devices of a
// backend's QubesDB: device-list-change, on R4.3 device-added/-removed for each
// difference from its device cache (empty when the backend starts, so the first change
// announces every present device), then the QubesDB watch event itself.
func (w *World) qdbChanged(vm *VM) {
	w.emit(vm.Name, "device-list-change:block")
	if w.dialect == R43 {
		now := map[string]bool{}
		for _, d := range w.published(vm) {
			now[d.name] = true
		}
		for _, port := range sortedSet(vm.announced) {
			if !now[port] {
				w.emit(vm.Name, "device-removed:block", "port", vm.Name+":"+port)
			}
		}
		for _, port := range sortedSet(now) {
			if !vm.announced[port] {
				w.emit(vm.Name, "device-added:block", "device", vm.Name+":"+port+":"+w.deviceID(vm.Name, port))
			}
		}
		vm.announced = now
	}
	w.emit(vm.Name, "domain-qdb-change:/qubes-block-devices", "path", "/qubes-block-devices")
}

func sortedSet(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// deviceListChanged is a udev trigger without a change (a hostile backend toggling).
func (w *World) deviceListChanged(vm *VM) { w.qdbChanged(vm) }

// deviceAdded: udev wrote the device's keys and the trigger.
func (w *World) deviceAdded(vm *VM) { w.qdbChanged(vm) }

// deviceRemoved: udev removed the device's keys, then wrote the trigger: two changes.
func (w *World) deviceRemoved(vm *VM, port string) {
	ref := qubes.DeviceRef{Backend: vm.Name, Port: port}
	if a := w.attachmentOf(ref); a != nil {
		// The backend device vanished under an attachment: the frontend's disk is dead.
		a.Stale = true
	}
	w.qdbChanged(vm)
	w.qdbChanged(vm)
}

func (w *World) attachEvents(a *Attachment, pre bool) {
	name := "device-attach:block"
	if pre {
		name = "device-pre-attach:block"
	}
	ro := "no"
	if a.ReadOnly {
		ro = "yes"
	}
	dev := a.Backend + ":" + a.Port
	if w.dialect == R43 {
		dev += ":" + w.deviceID(a.Backend, a.Port)
	}
	// frontend-dev is chosen by the block extension's pre-attach handler: only the
	// attach event carries it.
	opts := fmt.Sprintf("{'read-only': '%s'}", ro)
	if !pre {
		opts = fmt.Sprintf("{'read-only': '%s', 'frontend-dev': '%s'}", ro, a.FrontendDev)
	}
	w.emit(a.Frontend, name, "device", dev, "options", opts)
}

func (w *World) detachEvents(a *Attachment) {
	for _, name := range []string{"device-pre-detach:block", "device-detach:block"} {
		if w.dialect == R43 {
			w.emit(a.Frontend, name, "port", a.Backend+":"+a.Port)
		} else {
			w.emit(a.Frontend, name, "device", a.Backend+":"+a.Port)
		}
	}
}

func quoteName(n string) string { return "'" + n + "'" }
