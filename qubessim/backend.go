package qubessim

import (
	"errors"
	"fmt"
	"os/exec"
)

// backend is how the simulated qubes run: their block devices, mounts and commands. The
// sandbox backend gives each qube an in-memory kernel (kernel.go) that the fake block
// tools reach from a bubblewrap sandbox (sandbox.go); the kernel backend (hostkernel.go)
// uses the host's real kernel in namespaces. The world asks the backend it has and never
// which one it is. Calls are made with the world's lock held.
type backend interface {
	added(vm *VM) error          // a qube was created
	boot(vm *VM) error           // a qube starts
	teardown(vm *VM, clean bool) // a qube stops; clean: shut down (mounts written back), not killed
	// command is a command in the qube; commandDone runs when one has ended.
	command(vm *VM, home string, argv []string) *exec.Cmd
	commandDone(vm *VM)
	attach(a *Attachment, dev devInfo) error // Xen's part of an attach
	detach(a *Attachment) error              // Xen's part of a detach; fails while in use
	exposed(vm *VM) []devInfo                // the block devices a running qube exposes, by name
	plug(vm *VM, image, desc string, ro bool) (port string, err error)
	unplug(vm *VM, port string) error // a pulled disk: mounts of it are lost
}

// sandboxBackend runs qubes as in-memory kernels and bubblewrap sandboxes.
type sandboxBackend struct{ s *Sim }

func (b *sandboxBackend) added(vm *VM) error               { return b.s.listenKernel(vm.Name) }
func (b *sandboxBackend) boot(*VM) error                   { return nil }
func (b *sandboxBackend) teardown(vm *VM, clean bool)      { vm.kernel.teardown(clean) }
func (b *sandboxBackend) commandDone(*VM)                  {}
func (b *sandboxBackend) exposed(vm *VM) []devInfo         { return vm.kernel.exposed() }
func (b *sandboxBackend) unplug(vm *VM, port string) error { return vm.kernel.unplug(port) }

func (b *sandboxBackend) command(vm *VM, home string, argv []string) *exec.Cmd {
	var roMounts []string
	for _, m := range vm.kernel.mounts {
		if m.ro {
			roMounts = append(roMounts, m.target)
		}
	}
	return b.s.sandboxCommand(vm, home, roMounts, argv)
}

func (b *sandboxBackend) attach(a *Attachment, _ devInfo) error {
	vms := b.s.World.vms
	under := vms[a.Backend].kernel.devs[a.Port]
	vms[a.Frontend].kernel.devs[a.FrontendDev] = &bdev{name: a.FrontendDev, kind: kindXVD, att: a, ro: a.ReadOnly, io: &attachedIO{att: a, under: under.io}}
	return nil
}

func (b *sandboxBackend) detach(a *Attachment) error {
	k := b.s.World.vms[a.Frontend].kernel
	if d, ok := k.devs[a.FrontendDev]; ok {
		if who := k.busy(d); who != "" {
			return fmt.Errorf("%s is in use by %s", a.FrontendDev, who)
		}
		delete(k.devs, a.FrontendDev)
	}
	return nil
}

func (b *sandboxBackend) plug(vm *VM, image, desc string, ro bool) (string, error) {
	fio, err := newFileIO(image, ro)
	if err != nil {
		return "", fmt.Errorf("cannot plug %s: %w", image, err)
	}
	port := ""
	for c := 'a'; c <= 'z'; c++ {
		if _, used := vm.kernel.devs["sd"+string(c)]; !used {
			port = "sd" + string(c)
			break
		}
	}
	if port == "" {
		return "", errors.New("cannot plug: no free sdX name")
	}
	if desc == "" {
		desc = "QEMU_HARDDISK"
		if meta, _, err := readFSMeta(fio); err == nil && meta.Label != "" {
			desc += " (" + meta.Label + ")"
		}
	}
	vm.kernel.add(&bdev{name: port, kind: kindDisk, io: fio, file: fio, ro: ro, diskDesc: desc, diskPath: image})
	return port, nil
}
