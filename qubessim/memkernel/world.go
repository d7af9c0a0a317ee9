package memkernel

import (
	"errors"
	"fmt"
)

// What the world does to a qube's kernel: attach and detach devices of other qubes,
// plug and pull disks, list what the qube exposes, power it off.

// Device is a block device a qube exposes to qubesd (loop, dm, disks; not what came
// from another qube), as its udev scripts describe it.
type Device struct {
	Name, Desc string
	Parent     string // the disk of a partition
	Size       int64
	RO         bool
}

// Exposed lists the block devices the qube exposes, sorted by name.
func (k *Kernel) Exposed() []Device {
	var out []Device
	for _, d := range k.sortedDevs() {
		if d.exposed() {
			out = append(out, Device{Name: d.name, Desc: d.desc(), Size: d.io.Size(), RO: d.ro, Parent: d.parent})
		}
	}
	return out
}

// ReadOnlyMounts lists the mount points of read-only mounts.
func (k *Kernel) ReadOnlyMounts() []string {
	var out []string
	for _, m := range k.mounts {
		if m.ro {
			out = append(out, m.target)
		}
	}
	return out
}

// Attach gives the qube /dev/dev, a view of port of the backend's kernel; link reports
// the attachment's state (stale: the backend went away).
func (k *Kernel) Attach(dev string, backend *Kernel, port string, link func() (stale, ro bool)) error {
	under, ok := backend.devs[port]
	if !ok {
		return fmt.Errorf("cannot attach %s:%s: no such device", backend.host.Name(), port)
	}
	_, ro := link()
	k.devs[dev] = &bdev{name: dev, kind: kindXVD, link: link, ro: ro, io: &attachedIO{link: link, under: under.io}}
	return nil
}

// Detach removes an attached device; it fails while the device is in use.
func (k *Kernel) Detach(dev string) error {
	if d, ok := k.devs[dev]; ok {
		if who := k.busy(d); who != "" {
			return fmt.Errorf("%s is in use by %s", dev, who)
		}
		delete(k.devs, dev)
	}
	return nil
}

// PlugDisk plugs the image file as a disk with the description desc: at port, or ("")
// the first free sdX.
func (k *Kernel) PlugDisk(image, port, desc, parent string, ro bool) (string, error) {
	fio, err := newFileIO(image, ro)
	if err != nil {
		return "", fmt.Errorf("cannot plug %s: %w", image, err)
	}
	for c := 'a'; port == "" && c <= 'z'; c++ {
		if _, used := k.devs["sd"+string(c)]; !used {
			port = "sd" + string(c)
		}
	}
	if _, used := k.devs[port]; used || port == "" {
		fio.f.Close()
		if port == "" {
			return "", errors.New("cannot plug: no free sdX name")
		}
		return "", fmt.Errorf("cannot plug %s:%s: it exists", k.host.Name(), port)
	}
	k.add(&bdev{name: port, kind: kindDisk, io: fio, file: fio, ro: ro, diskDesc: desc, diskPath: image, parent: parent})
	return port, nil
}

// Unplug pulls a disk out: mounts of it are lost (not written back), like yanking a stick.
func (k *Kernel) Unplug(port string) error {
	b, ok := k.devs[port]
	if !ok || b.kind != kindDisk {
		return fmt.Errorf("cannot unplug %s:%s: no such disk", k.host.Name(), port)
	}
	if m := k.mountOf(b); m != nil {
		_ = k.umount(m.target, false) // nothing is written back
	}
	k.remove(b)
	b.file.f.Close()
	return nil
}

// Teardown is the qube's power-off: mounts are written back on a clean shutdown and
// dropped on a kill; every device but a plugged disk goes away.
func (k *Kernel) Teardown(clean bool) {
	for i := len(k.mounts) - 1; i >= 0; i-- {
		// A power-off goes on: what cannot be written back is lost, as on a real one.
		_ = k.unmount(k.mounts[i], clean)
	}
	k.mounts = nil
	for _, b := range k.sortedDevs() {
		if b.kind == kindDisk {
			continue // still plugged: found again when the qube boots
		}
		if b.file != nil && b.kind == kindLoop {
			b.file.f.Close()
		}
		delete(k.devs, b.name)
	}
}

// DiskDesc is what a qube's udev reports for a plugged USB disk holding the image:
// QEMU_HARDDISK and the label of its file system, if it has one.
func DiskDesc(image string) string {
	desc := "QEMU_HARDDISK"
	fio, err := newFileIO(image, true)
	if err != nil {
		return desc
	}
	defer fio.f.Close()
	if meta, _, err := readFSMeta(fio); err == nil && meta.Label != "" {
		desc += " (" + meta.Label + ")"
	}
	return desc
}
