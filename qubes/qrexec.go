package qubes

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// DefaultQrexecClient is dom0's qrexec-client.
const DefaultQrexecClient = "/usr/lib/qubes/qrexec-client"

// Exit statuses of qrexec-client (R4.2+) that mean the command never ran or its result
// is unknown: QREXEC_EXIT_PROBLEM, _REQUEST_REFUSED, _SERVICE_NOT_FOUND, and 255 when the
// vchan closed before the command's status came (the qube died during the call; seen
// with the real qrexec-client of 4.2 and 4.3).
const (
	ExitQrexecProblem  = 125
	ExitQrexecRefused  = 126
	ExitQrexecNotFound = 127
	ExitQrexecLost     = 255
)

// ErrTransport is matched by a *TransportError.
var ErrTransport = errors.New("qrexec transport failure")

// TransportError is a qrexec failure: the qube was not reachable or refused the service.
type TransportError struct {
	VM     string
	Code   int
	Stderr string // printable head of qrexec-client's stderr
}

func (e *TransportError) Error() string {
	msg := fmt.Sprintf("cannot run a command in %s: qrexec-client exited %d", e.VM, e.Code)
	if e.Stderr != "" {
		msg += ": " + e.Stderr
	}
	return msg
}

// Is makes errors.Is(err, ErrTransport) true.
func (e *TransportError) Is(target error) bool { return target == ErrTransport }

// Result of a script run in a qube. ExitCode is the script's own status (0..124, or
// 128+signal); Stdout and Stderr are cut at the runner's limit.
type Result struct {
	ExitCode        int
	Stdout, Stderr  []byte
	StdoutTruncated bool
	StderrTruncated bool
}

// Runner runs shell scripts as root in qubes through qrexec-client, the way
// `qvm-run --pass-io -u root --no-gui` does, without its Admin API round trips: the
// caller ensures the qube runs.
type Runner struct {
	// Command is the qrexec-client invocation before its own arguments, e.g.
	// ["/usr/lib/qubes/qrexec-client"] or ["qubes-sim", "qrexec-client", "--socket", S].
	Command []string
	// ConnectTimeout is passed as -w (seconds); 0 leaves qrexec-client's default.
	ConnectTimeout int
	// MaxOutput caps what is kept of stdout and of stderr; the rest is read and dropped.
	MaxOutput int
	// Timeout bounds one run when the context has no earlier deadline; qrexec itself has
	// no execution timeout.
	Timeout time.Duration
	// KillDelay is how long a timed-out qrexec-client gets after SIGTERM before SIGKILL.
	KillDelay time.Duration
	// MaxParallel bounds the calls into qubes that run at once (0: no bound): parallel
	// qrexec calls stall on real Qubes (QubesOS/qubes-issues#6755). Set before first use.
	MaxParallel int

	spawns  atomic.Int64
	waiting atomic.Int64
	once    sync.Once
	slots   chan struct{}
}

// NewRunner returns a runner for the given qrexec-client command line with safe limits.
func NewRunner(command []string) *Runner {
	if len(command) == 0 {
		command = []string{DefaultQrexecClient}
	}
	return &Runner{Command: command, MaxOutput: 64 << 10, Timeout: 5 * time.Minute, KillDelay: 2 * time.Second}
}

// Spawns counts processes started (one per Run).
func (r *Runner) Spawns() int64 { return r.spawns.Load() }

// Waiting counts calls waiting for a slot under MaxParallel.
func (r *Runner) Waiting() int64 { return r.waiting.Load() }

// acquire takes a slot (MaxParallel) or fails when ctx ends first; release gives it back.
func (r *Runner) acquire(ctx context.Context) (release func(), err error) {
	r.once.Do(func() {
		if r.MaxParallel > 0 {
			r.slots = make(chan struct{}, r.MaxParallel)
		}
	})
	if r.slots == nil {
		return func() {}, nil
	}
	r.waiting.Add(1)
	defer r.waiting.Add(-1)
	select {
	case r.slots <- struct{}{}:
		return func() { <-r.slots }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Run executes script with /bin/bash as root in vm (qubes.VMShell). input, if not nil,
// follows the script on stdin and is what the script's commands read. The script runs
// in a subshell so that a failing command cannot produce 125..127 or 255, which are
// reserved for transport failures; those statuses become 124.
func (r *Runner) Run(ctx context.Context, vm, script string, input io.Reader) (Result, error) {
	if err := ValidateVMName(vm); err != nil {
		return Result{}, err
	}
	args := append([]string{}, r.Command[1:]...)
	args = append(args, "-d", vm)
	if r.ConnectTimeout > 0 {
		args = append(args, "-w", fmt.Sprint(r.ConnectTimeout))
	}
	args = append(args, "root:QUBESRPC qubes.VMShell+ dom0")
	release, err := r.acquire(ctx)
	if err != nil {
		return Result{}, fmt.Errorf("cannot run a command in %s: %w", vm, err)
	}
	defer release()
	res, err := r.exec(ctx, r.Command[0], args, script, input, nil)
	if err != nil {
		return res, fmt.Errorf("cannot run a command in %s: %w", vm, err)
	}
	if res.ExitCode < 0 {
		// Killed by a signal before exiting: the remote state is unknown.
		return res, &TransportError{VM: vm, Code: res.ExitCode}
	}
	switch res.ExitCode {
	case ExitQrexecProblem, ExitQrexecRefused, ExitQrexecNotFound, ExitQrexecLost:
		return res, &TransportError{VM: vm, Code: res.ExitCode, Stderr: Printable(string(res.Stderr), 200)}
	}
	return res, nil
}

// exec runs name with args, the wrapped script and input on stdin, and collects capped
// output. Only a failure to run at all or the context ending is an error.
func (r *Runner) exec(ctx context.Context, name string, args []string, script string, input io.Reader, files []*os.File) (Result, error) {
	if _, ok := ctx.Deadline(); !ok && r.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, r.Timeout)
		defer cancel()
	}
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = r.KillDelay

	var stdin io.Reader = strings.NewReader(WrapScript(script))
	if input != nil {
		stdin = io.MultiReader(stdin, input)
	}
	cmd.Stdin = stdin
	cmd.ExtraFiles = files
	stdout := &CapWriter{Max: r.MaxOutput}
	stderr := &CapWriter{Max: r.MaxOutput}
	cmd.Stdout, cmd.Stderr = stdout, stderr

	r.spawns.Add(1)
	err := cmd.Run()
	res := Result{
		Stdout: stdout.buf.Bytes(), Stderr: stderr.buf.Bytes(),
		StdoutTruncated: stdout.dropped, StderrTruncated: stderr.dropped,
	}
	if ctx.Err() != nil {
		return res, ctx.Err()
	}
	if cmd.ProcessState == nil {
		return res, fmt.Errorf("cannot start %s: %w", name, err)
	}
	res.ExitCode = cmd.ProcessState.ExitCode()
	return res, nil
}

// LocalDom0 runs scripts in dom0 itself, with the runner's limits, and reads dom0 files:
// the place luks-init builds containers.
type LocalDom0 struct {
	Runner *Runner
}

// Run runs script as the daemon's user (root) with bash; files are its descriptors 3,
// 4, ... (/dev/fd/3 for the first).
func (d LocalDom0) Run(ctx context.Context, script string, input io.Reader, files ...*os.File) (Result, error) {
	res, err := d.Runner.exec(ctx, "/bin/bash", nil, script, input, files)
	if err != nil {
		return res, fmt.Errorf("cannot run a command in dom0: %w", err)
	}
	return res, nil
}

// Open opens a dom0 file.
func (LocalDom0) Open(path string) (io.ReadCloser, error) { return os.Open(path) }

// WrapScript is what is sent before the input bytes: the script in a subshell, then the
// status mapping, then exit, all parsed by bash before any input byte is read.
func WrapScript(script string) string {
	// The closing line must hold everything after the subshell: bash runs a command as
	// soon as its line is complete, and the input bytes follow right after.
	return "(\n" + script + "\n); qcrypt_rc=$?; case $qcrypt_rc in 125|126|127|255) qcrypt_rc=124;; esac; exit $qcrypt_rc\n"
}

// CapWriter keeps the first Max bytes and drops the rest, so a flooding qube (or hook)
// costs only CPU, not memory.
type CapWriter struct {
	Max     int
	buf     bytes.Buffer
	dropped bool
}

// Bytes is what was kept.
func (w *CapWriter) Bytes() []byte { return w.buf.Bytes() }

// Dropped says whether anything was not kept.
func (w *CapWriter) Dropped() bool { return w.dropped }

func (w *CapWriter) Write(p []byte) (int, error) {
	room := w.Max - w.buf.Len()
	if room >= len(p) {
		w.buf.Write(p)
	} else {
		if room > 0 {
			w.buf.Write(p[:room])
		}
		w.dropped = true
	}
	return len(p), nil
}

// RemoteDom0 is a dom0 reached through qrexec-client whose files are under Root on this
// machine: the simulator's dom0 (qcryptd --dom0-root). Production uses LocalDom0.
type RemoteDom0 struct {
	Runner *Runner
	Root   string
}

// Run runs a script in that dom0. qrexec carries no descriptors: files are refused.
func (d RemoteDom0) Run(ctx context.Context, script string, input io.Reader, files ...*os.File) (Result, error) {
	if len(files) > 0 {
		return Result{}, errors.New("cannot pass a file to the simulated dom0 (qrexec carries no descriptors)")
	}
	return d.Runner.Run(ctx, "dom0", script, input)
}

// Open opens one of its files.
func (d RemoteDom0) Open(path string) (io.ReadCloser, error) {
	clean := filepath.Clean("/" + path)
	return os.Open(filepath.Join(d.Root, clean))
}
