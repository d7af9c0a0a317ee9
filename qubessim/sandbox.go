package qubessim

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/qcrypt/qcrypt/qubessim/inqube"
	"github.com/qcrypt/qcrypt/qubessim/kernelcall"
)

// prepareTools makes dir hold the tools binary and one symlink per tool name.
func prepareTools(dir, binary string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// A copy, not the original path: the sandbox sees only this directory.
	if err := linkBinary(binary, filepath.Join(dir, "qubes-sim")); err != nil {
		return err
	}
	for _, t := range inqube.ToolNames {
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
	dirs, links := inqube.HostSystem()
	for _, d := range dirs {
		args = append(args, "--ro-bind", "/"+d, "/"+d)
	}
	// bwrap's --symlink fails once the link exists, and the root persists between
	// commands: the links are made in the tree itself.
	linkErr := inqube.LinkSystem(vm.root, links)
	for _, mp := range roMounts {
		args = append(args, "--ro-bind", filepath.Join(vm.root, mp), mp)
	}
	args = append(args,
		"--dev", "/dev",
		"--proc", "/proc",
		"--tmpfs", "/run",
		"--ro-bind", s.toolsDir, inqube.ToolsDir,
		"--bind", filepath.Dir(s.kernelSocket(vm.Name)), filepath.Dir(inqube.KernelSocket),
		"--unshare-all", "--unshare-user", "--uid", "0", "--gid", "0",
		"--hostname", vm.Name,
		"--die-with-parent",
		"--clearenv",
		"--setenv", "PATH", inqube.ToolsDir+":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"--setenv", "HOME", home,
		"--setenv", "USER", "root",
		"--setenv", "LANG", "C.UTF-8",
		"--setenv", kernelcall.SocketEnv, inqube.KernelSocket,
		"--setenv", "QUBES_SIM_VM", vm.Name,
		"--chdir", home,
		"--", inqube.ToolsDir+"/qubes-sim", "sandbox-init", "--",
	)
	args = append(args, argv...)
	cmd := exec.Command(s.bwrap, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if linkErr != nil {
		cmd.Err = fmt.Errorf("cannot link the host system into %s: %w", vm.Name, linkErr) // Start returns it
	}
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
