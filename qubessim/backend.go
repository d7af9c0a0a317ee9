package qubessim

import (
	"os/exec"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/memkernel"
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
func (b *sandboxBackend) teardown(vm *VM, clean bool)      { vm.kernel.Teardown(clean) }
func (b *sandboxBackend) commandDone(*VM)                  {}
func (b *sandboxBackend) unplug(vm *VM, port string) error { return vm.kernel.Unplug(port) }

func (b *sandboxBackend) exposed(vm *VM) []devInfo {
	var out []devInfo
	for _, d := range vm.kernel.Exposed() {
		out = append(out, devInfo{name: d.Name, desc: d.Desc, size: d.Size, ro: d.RO, parent: d.Parent})
	}
	return out
}

func (b *sandboxBackend) command(vm *VM, home string, argv []string) *exec.Cmd {
	return b.s.sandboxCommand(vm, home, vm.kernel.ReadOnlyMounts(), argv)
}

func (b *sandboxBackend) attach(a *Attachment, _ devInfo) error {
	vms := b.s.World.vms
	return vms[a.Frontend].kernel.Attach(a.FrontendDev, vms[a.Backend].kernel, a.Port, func() (bool, bool) { return a.Stale, a.ReadOnly })
}

func (b *sandboxBackend) detach(a *Attachment) error {
	return b.s.World.vms[a.Frontend].kernel.Detach(a.FrontendDev)
}

func (b *sandboxBackend) plug(vm *VM, image, desc string, ro bool) (string, error) {
	if desc == "" {
		desc = memkernel.DiskDesc(image)
	}
	return vm.kernel.PlugDisk(image, "", desc, "", ro)
}

// kernelHost is the world as one qube's in-memory kernel sees it (World.mu held).
type kernelHost struct {
	w  *World
	vm *VM
}

func (h kernelHost) Name() string              { return h.vm.Name }
func (h kernelHost) Root() string              { return h.vm.root }
func (h kernelHost) StashDir() string          { return h.w.dir }
func (h kernelHost) DeviceAdded()              { h.w.deviceAdded(h.vm) }
func (h kernelHost) DeviceRemoved(port string) { h.w.deviceRemoved(h.vm, port) }

func (h kernelHost) AttachedTo(port string) string {
	if a := h.w.attachmentOf(qubes.DeviceRef{Backend: h.vm.Name, Port: port}); a != nil {
		return a.Frontend
	}
	return ""
}
