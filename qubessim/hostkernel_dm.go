// The host's device-mapper and sysfs, as the kernel backend uses them.

package qubessim

import (
	"fmt"
	"os"
	"os/exec"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/internal/sysblock"
)

// failMapping makes a frontend's device fail every I/O, as a device whose backend went
// away does. If dmsetup cannot, the simulation is wrong from then on: say so loudly.
func failMapping(name string) {
	info, ok := mapperDev(name)
	if !ok {
		return
	}
	err := dmsetup("load", name, "--table", fmt.Sprintf("0 %d error", info.size/512))
	if err == nil {
		err = dmsetup("resume", name)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "qubes-sim: cannot fail %s, it still works: %v\n", name, err)
	}
}

func dmsetup(args ...string) error {
	cmd := exec.Command("dmsetup", args...)
	cmd.Env = append(os.Environ(), "DM_DISABLE_UDEV=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("dmsetup %s: %w: %s", args[0], err, qubes.Printable(strings.TrimSpace(string(out)), 200))
	}
	return nil
}

// linkBinary puts binary at dst (a hard link when possible, else a copy).
func linkBinary(binary, dst string) error {
	os.Remove(dst)
	if os.Link(binary, dst) == nil {
		return nil
	}
	data, err := os.ReadFile(binary)
	if err != nil {
		return fmt.Errorf("cannot read the simulator binary: %w", err)
	}
	return os.WriteFile(dst, data, 0o755)
}

func (d devInfo) sys() sysblock.Dev {
	return sysblock.Dev{Name: d.name, Size: d.size, RO: d.ro, Major: d.major, Minor: d.minor}
}

// sysDev reads a block device of the host from sysfs.
func sysDev(name string) (devInfo, bool) { return fromSys(sysblock.Read(name)) }

// mapperDev finds a device-mapper device of the host by its name.
func mapperDev(name string) (devInfo, bool) { return fromSys(sysblock.ByMapperName(name)) }

func fromSys(d sysblock.Dev, ok bool) (devInfo, bool) {
	return devInfo{name: d.Name, size: d.Size, ro: d.RO, major: d.Major, minor: d.Minor}, ok
}

// loopBackedBy reports whether loop device name is backed by the file at path (compared
// by device and inode, as losetup -j does): the path is looked up through the qube's
// root, so a loop device of another qube never matches.
func loopBackedBy(name, path string) bool {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil {
		return false
	}
	fd, err := unix.Open("/dev/"+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	info, err := unix.IoctlLoopGetStatus64(fd)
	return err == nil && info.Inode == st.Ino && info.Device == st.Dev
}
