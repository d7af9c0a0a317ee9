// Package inqube is what the simulator runs inside a qube: the fake block tools
// (sandbox backend) that call the qube's kernel through kernelcall, sandbox-init that
// fills the sandbox's /dev, and for the kernel backend the holder process that owns the
// qube's namespaces and the cryptsetup and dmsetup wrappers. The qubes-sim binary is
// all of them, chosen by the name it is run under.
package inqube

import (
	"os"
	"path/filepath"
)

// What the simulator and what runs inside its qubes agree on.
const (
	// ToolsDir holds the simulator binary in every qube, under each name it answers to
	// there: the fake tools (sandbox backend), the cryptsetup and dmsetup wrappers
	// (kernel backend), qrexec's service scripts.
	ToolsDir = "/run/qubes-sim/bin"
	// KernelSocket is the qube's simulated kernel (sandbox backend; kernelcall).
	KernelSocket = "/run/qubes-sim/k/kernel.sock"
	// MapperPrefixEnv holds the qube's name inside a qube of the kernel backend:
	// device-mapper names are global in one kernel, so the wrappers name a qube's maps
	// "QUBE:NAME" and show NAME.
	MapperPrefixEnv = "QUBES_SIM_DM_PREFIX"
	// AttachMapPrefix begins the name of an attachment's map, "att#FRONTEND#xvdX"
	// ('#' is not in qube names).
	AttachMapPrefix = "att#"
	// MaxLoopNodes is how many /dev/loopN nodes a qube of the kernel backend has.
	MaxLoopNodes = 128
)

// HostSystem lists the host's top-level program directories a qube shares besides /usr
// and /etc: real directories to bind read-only, and merged-/usr symlinks (name ->
// target) to make in the qube's root.
func HostSystem() (dirs []string, links map[string]string) {
	links = map[string]string{}
	for _, d := range []string{"bin", "sbin", "lib", "lib64", "lib32", "libx32"} {
		st, err := os.Lstat("/" + d)
		switch {
		case err != nil:
		case st.Mode()&os.ModeSymlink != 0:
			links[d], _ = os.Readlink("/" + d)
		default:
			dirs = append(dirs, d)
		}
	}
	return dirs, links
}

// LinkSystem makes the merged-/usr symlinks in a qube's root.
func LinkSystem(root string, links map[string]string) error {
	for d, target := range links {
		link := filepath.Join(root, d)
		if cur, err := os.Readlink(link); err == nil && cur == target {
			continue
		}
		os.RemoveAll(link)
		if err := os.Symlink(target, link); err != nil {
			return err
		}
	}
	return nil
}

// ToolNames are the commands the fake tools binary answers to inside a qube.
var ToolNames = []string{"losetup", "cryptsetup", "dmsetup", "mount", "umount", "findmnt", "blockdev", "mkfs", "mkfs.ext4", "mkfs.btrfs", "btrfs"}
