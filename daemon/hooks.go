package daemon

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"syscall"
	"time"

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
// own process group (all of it is killed at the timeout), output kept up to a bound.
func hookRunner(timeout time.Duration) func(ctx context.Context, command string, env []string) error {
	return func(ctx context.Context, command string, env []string) error {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		cmd := exec.CommandContext(ctx, "/bin/sh", "-c", command)
		cmd.Env = append(append([]string{}, hookEnvBase...), env...)
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
		cmd.WaitDelay = 5 * time.Second // a child holding the output pipe open
		out := &qubes.CapWriter{Max: hookOutputMax}
		cmd.Stdout, cmd.Stderr = out, out
		err := cmd.Run()
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("timed out after %s", timeout)
		}
		if err != nil {
			return fmt.Errorf("%w: %s", err, qubes.Printable(string(out.Bytes()), 300))
		}
		return nil
	}
}
