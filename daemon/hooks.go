package daemon

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/qcrypt/qcrypt/qubes"
)

// DefaultHookTimeout bounds a pre/post open/close command.
const DefaultHookTimeout = 60 * time.Second

// hookOutputMax is how much of a hook's output is kept for the error message.
const hookOutputMax = 4096

// hookEnvBase is the whole environment of a hook besides its QCRYPT_* variables: none
// of qcryptd's own (NOTIFY_SOCKET, WATCHDOG_*, the bus address, credentials).
var hookEnvBase = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8"}

// hookRunner runs a dom0 hook command with /bin/sh as root: a clean environment, its
// own PID namespace, output kept up to a bound. The shell is the namespace's first
// process: when it ends, or is killed at the timeout, the kernel kills every process the
// hook started, also one that left its process group and session (setsid). Where no
// PID namespace can be made (a unit with RestrictNamespaces=yes), the hook runs in its
// own process group, which is killed at the timeout, and this is logged once.
func hookRunner(timeout time.Duration, log *logrus.Entry) func(ctx context.Context, command string, env []string) error {
	var once sync.Once
	return func(ctx context.Context, command string, env []string) error {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		out := &qubes.CapWriter{Max: hookOutputMax}
		hookCmd := func(flags uintptr) *exec.Cmd {
			cmd := exec.CommandContext(ctx, "/bin/sh", "-c", command)
			cmd.Env = append(append([]string{}, hookEnvBase...), env...)
			cmd.Dir = "/"
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Cloneflags: flags}
			cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
			cmd.WaitDelay = 5 * time.Second // a child holding the output pipe open
			cmd.Stdout, cmd.Stderr = out, out
			return cmd
		}
		cmd := hookCmd(syscall.CLONE_NEWPID)
		err := cmd.Start()
		if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EINVAL) {
			once.Do(func() {
				log.WithError(err).Warn("hooks run without a PID namespace: a process a hook detaches may outlive it")
			})
			cmd = hookCmd(0)
			err = cmd.Start()
		}
		if err == nil {
			err = cmd.Wait()
		}
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("timed out after %s", timeout)
		}
		if err != nil {
			return fmt.Errorf("%w: %s", err, qubes.Printable(string(out.Bytes()), 300))
		}
		return nil
	}
}
