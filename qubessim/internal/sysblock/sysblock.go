// Package sysblock reads the host kernel's block devices from sysfs and makes their
// nodes: what the kernel backend's host side and its qubes' holders both need.
package sysblock

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Dev is a block device of the host kernel.
type Dev struct {
	Name         string // as in /sys/block
	Size         int64  // bytes
	RO           bool
	Major, Minor uint32
}

// Read reads a block device's size, read-only flag and number.
func Read(name string) (Dev, bool) {
	read := func(f string) string {
		b, _ := os.ReadFile("/sys/block/" + name + "/" + f)
		return strings.TrimSpace(string(b))
	}
	sectors, err := strconv.ParseInt(read("size"), 10, 64)
	majS, minS, ok := strings.Cut(read("dev"), ":")
	maj, err1 := strconv.ParseUint(majS, 10, 32)
	mnr, err2 := strconv.ParseUint(minS, 10, 32)
	if err != nil || !ok || err1 != nil || err2 != nil {
		return Dev{}, false
	}
	return Dev{Name: name, Size: sectors * 512, RO: read("ro") == "1", Major: uint32(maj), Minor: uint32(mnr)}, true
}

// ByMapperName finds a device-mapper device by its name.
func ByMapperName(name string) (Dev, bool) {
	dms, _ := filepath.Glob("/sys/block/dm-*")
	for _, p := range dms {
		if raw, err := os.ReadFile(p + "/dm/name"); err == nil && strings.TrimSpace(string(raw)) == name {
			return Read(filepath.Base(p))
		}
	}
	return Dev{}, false
}

// Mknod makes (anew) the node at path for d.
func (d Dev) Mknod(path string) error {
	os.Remove(path)
	return unix.Mknod(path, unix.S_IFBLK|0o660, int(unix.Mkdev(d.Major, d.Minor)))
}
