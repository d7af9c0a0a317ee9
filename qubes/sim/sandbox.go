package sim

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
)

// Paths inside every sandbox.
const (
	sandboxTools  = "/run/qubes-sim/bin"
	sandboxKernel = "/run/qubes-sim/k/kernel.sock"
)

// ToolNames are the commands the fake tools binary answers to inside a qube.
var ToolNames = []string{"losetup", "cryptsetup", "mount", "umount", "findmnt", "blockdev", "mkfs", "mkfs.ext4", "mkfs.btrfs", "btrfs"}

// prepareTools makes dir hold the tools binary and one symlink per tool name.
func prepareTools(dir, binary string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// A copy, not the original path: the sandbox sees only this directory.
	if err := linkBinary(binary, filepath.Join(dir, "qubes-sim")); err != nil {
		return err
	}
	for _, t := range ToolNames {
		os.Remove(filepath.Join(dir, t))
		if err := os.Symlink("qubes-sim", filepath.Join(dir, t)); err != nil {
			return err
		}
	}
	return nil
}

// sandboxCommand builds the bwrap command that runs argv as root inside vm: the qube's
// own tree as /, the host's /usr and /etc read-only, private /dev, /proc, /run, the fake
// tools first in PATH and the qube's kernel socket. Read-only mounts of the qube are
// bound read-only so writes fail with EROFS as on a real read-only mount.
func (s *Sim) sandboxCommand(vm *VM, home string, roMounts []string, argv []string) *exec.Cmd {
	args := []string{
		"--bind", vm.root, "/",
		"--ro-bind", "/usr", "/usr",
		"--ro-bind", "/etc", "/etc",
	}
	for _, d := range []string{"bin", "sbin", "lib", "lib64", "lib32", "libx32"} {
		host := "/" + d
		st, err := os.Lstat(host)
		switch {
		case err != nil:
		case st.Mode()&os.ModeSymlink != 0:
			// Merged /usr: the same symlink in the qube's root (bwrap's --symlink fails
			// once it exists, and the root persists between commands).
			target, _ := os.Readlink(host)
			link := filepath.Join(vm.root, d)
			if cur, err := os.Readlink(link); err != nil || cur != target {
				os.RemoveAll(link)
				os.Symlink(target, link)
			}
		default:
			args = append(args, "--ro-bind", host, host)
		}
	}
	for _, mp := range roMounts {
		args = append(args, "--ro-bind", filepath.Join(vm.root, mp), mp)
	}
	args = append(args,
		"--dev", "/dev",
		"--proc", "/proc",
		"--tmpfs", "/run",
		"--ro-bind", s.toolsDir, sandboxTools,
		"--bind", filepath.Dir(s.kernelSocket(vm.Name)), filepath.Dir(sandboxKernel),
		"--unshare-all", "--unshare-user", "--uid", "0", "--gid", "0",
		"--hostname", vm.Name,
		"--die-with-parent",
		"--clearenv",
		"--setenv", "PATH", sandboxTools+":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"--setenv", "HOME", home,
		"--setenv", "USER", "root",
		"--setenv", "LANG", "C.UTF-8",
		"--setenv", "QUBES_SIM_KERNEL", sandboxKernel,
		"--setenv", "QUBES_SIM_VM", vm.Name,
		"--chdir", home,
		"--", sandboxTools+"/qubes-sim", "sandbox-init", "--",
	)
	args = append(args, argv...)
	cmd := exec.Command(s.bwrap, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd
}

func killGroup(cmd *exec.Cmd) {
	if cmd.Process != nil {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
}

// parseCmdline maps a qrexec command line to what runs in the qube: the qubes.VMShell
// service is bash reading its script from stdin (as /etc/qubes-rpc/qubes.VMShell does);
// the legacy form runs the command with bash -c. ok=false means "service not found".
func parseCmdline(cmdline string) (argv []string, ok bool) {
	cmdline = strings.TrimPrefix(cmdline, "nogui:")
	if rest, isRPC := strings.CutPrefix(cmdline, "QUBESRPC "); isRPC {
		service, _, _ := strings.Cut(rest, " ")
		service, _, _ = strings.Cut(service, "+")
		if service != "qubes.VMShell" {
			return nil, false
		}
		return []string{"/bin/bash"}, true
	}
	return []string{"/bin/bash", "-c", cmdline}, true
}
