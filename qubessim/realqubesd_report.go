// What the simulator tells the real qubesd: the qubes' block devices, as their udev would, and new qubes.

package qubessim

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/qcrypt/qcrypt/qubes"
)

// report tells the server each running qube's block devices, as the qubes' udev would.
func (r *realQubesd) report() error {
	r.syncMu.Lock()
	defer r.syncMu.Unlock()
	return r.reportLocked()
}

func (r *realQubesd) reportLocked() error {
	w := r.s.World
	var lines []string
	w.mu.Lock()
	for _, vm := range w.sortedVMs() {
		if !vm.running() {
			continue
		}
		now := map[string]string{}
		for _, d := range w.published(vm) {
			mode := "w"
			if d.ro {
				mode = "r"
			}
			desc := w.description(qubes.DeviceRef{Backend: vm.Name, Port: d.name}, d.desc)
			// The control socket reads one line of words.
			desc = strings.Join(strings.Fields(desc), " ")
			now[d.name] = fmt.Sprintf("%d %s %s", d.size, mode, desc)
		}
		old := r.reported[vm.Name]
		for _, port := range sortedKeys(old) {
			if _, ok := now[port]; !ok {
				lines = append(lines, "block-remove "+vm.Name+" "+port)
			}
		}
		for _, port := range sortedKeys(now) {
			if old[port] != now[port] {
				lines = append(lines, "block-add "+vm.Name+" "+port+" "+now[port])
			}
		}
		r.reported[vm.Name] = now
	}
	w.mu.Unlock()
	for _, l := range lines {
		if err := r.srv.Ctl(l); err != nil {
			return err
		}
	}
	if len(lines) > 0 {
		r.detachStale()
	}
	return nil
}

// detachStale retries the detaches syncVM could not do. r.syncMu held.
func (r *realQubesd) detachStale() {
	ctx, cancel := context.WithTimeout(context.Background(), realCallTimeout)
	defer cancel()
	for _, fe := range sortedKeys(r.stale) {
		var left []qubes.DeviceRef
		for _, ref := range r.stale[fe] {
			if err := r.client.Detach(ctx, fe, ref); err != nil {
				left = append(left, ref)
			}
		}
		r.stale[fe] = left
		if len(left) == 0 {
			delete(r.stale, fe)
		}
	}
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// createVM adds an AppVM through the Admin API, as qvm-create does.
func (r *realQubesd) createVM(name, class, user string) error {
	if class != "AppVM" {
		return fmt.Errorf("cannot add %s as %s: with the real qubesd only AppVMs (on debian-12) are made", name, class)
	}
	if err := qubes.ValidateVMName(name); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), realCallTimeout)
	defer cancel()
	if _, err := r.client.Call(ctx, qubes.Request{Method: "admin.vm.Create.AppVM", Arg: "debian-12", Dest: "dom0",
		Payload: []byte("name=" + name + " label=red")}); err != nil {
		return fmt.Errorf("cannot create %s: %w", name, err)
	}
	if user != "" && user != "user" {
		if _, err := r.client.Call(ctx, qubes.Request{Method: "admin.vm.property.Set", Arg: "default_user", Dest: name,
			Payload: []byte(user)}); err != nil {
			return fmt.Errorf("cannot set the default user of %s: %w", name, err)
		}
	}
	r.barrier()
	if _, ok := r.s.World.VM(name); !ok {
		return fmt.Errorf("cannot add %s: the simulator did not learn of it", name)
	}
	return nil
}

// demoQubes makes sure the demo's qubes exist (the real server's own world has them)
// and sys-usb runs.
func (r *realQubesd) demoQubes() error {
	for _, name := range []string{"sys-usb", "mediator", "work"} {
		if _, ok := r.s.World.VM(name); !ok {
			if err := r.createVM(name, "AppVM", "user"); err != nil {
				return err
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), realCallTimeout)
	defer cancel()
	if err := r.client.Start(ctx, "sys-usb"); err != nil {
		return err
	}
	r.barrier()
	w := r.s.World
	w.mu.Lock()
	defer w.mu.Unlock()
	if vm, ok := w.vms["sys-usb"]; !ok || !vm.running() {
		return errors.New("cannot set up the demo: sys-usb does not run")
	}
	return nil
}
