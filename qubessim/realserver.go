package qubessim

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// RealServer is the real qubesd (Dir/start.sh, the test equipment in
// ../shared/real-qubesd) run as a child process on Socket.
type RealServer struct {
	Dir     string // holds start.sh
	Version Dialect
	Socket  string
	State   string    // its store, kept over a restart; "" for a fresh one removed at exit
	Log     io.Writer // its output

	mu     sync.Mutex
	proc   *exec.Cmd
	exited chan struct{}
}

// Start runs start.sh and waits for its READY line. Starts are serialised across
// processes: start.sh unpacks the sources into a shared cache on first use.
func (r *RealServer) Start() error {
	lock, err := os.OpenFile(filepath.Join(os.TempDir(), "qubes-sim-real-qubesd.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer lock.Close() // closing the file releases the lock
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return err
	}

	pr, pw, err := os.Pipe()
	if err != nil {
		return err
	}
	cmd := exec.Command(filepath.Join(r.Dir, "start.sh"), r.Socket, string(r.Version))
	cmd.Env = os.Environ()
	if r.State != "" {
		cmd.Env = append(cmd.Env, "STATE="+r.State)
	}
	cmd.Stdout, cmd.Stderr = pw, r.Log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	pw.Close()
	if err != nil {
		pr.Close()
		return fmt.Errorf("cannot start the real qubesd: %w", err)
	}
	ready := make(chan struct{})
	go func() {
		defer pr.Close()
		sc := bufio.NewScanner(pr)
		once := sync.Once{}
		for sc.Scan() {
			fmt.Fprintln(r.Log, "real qubesd:", sc.Text())
			if strings.HasPrefix(sc.Text(), "READY ") {
				once.Do(func() { close(ready) })
			}
		}
	}()
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }() // ProcessState tells how it ended
	select {
	case <-ready:
	case <-exited:
		return fmt.Errorf("cannot start the real qubesd %s: start.sh ended (%s); its output is in the simulator's log", r.Version, cmd.ProcessState)
	case <-time.After(realReadyTimeout):
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
		return fmt.Errorf("cannot start the real qubesd %s: not ready after %s", r.Version, realReadyTimeout)
	}
	r.mu.Lock()
	r.proc, r.exited = cmd, exited
	r.mu.Unlock()
	return nil
}

// Stop ends the server as systemd would stop qubesd: SIGTERM to start.sh, which
// saves the store and what Xen would keep running.
func (r *RealServer) Stop() {
	r.mu.Lock()
	cmd, exited := r.proc, r.exited
	r.proc = nil
	r.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(time.Minute):
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-exited
	}
}

// Ctl sends one line to the server's control socket (what a qube writes to QubesDB).
func (r *RealServer) Ctl(line string) error {
	c, err := net.DialTimeout("unix", r.Socket+".ctl", realCallTimeout)
	if err != nil {
		return fmt.Errorf("cannot reach the real qubesd's control socket: %w", err)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(realCallTimeout)); err != nil {
		return err
	}
	if _, err := io.WriteString(c, line+"\n"); err != nil {
		return err
	}
	resp, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("real qubesd control %q: %w", line, err)
	}
	if resp = strings.TrimSpace(resp); resp != "ok" {
		return fmt.Errorf("real qubesd control %q: %s", line, resp)
	}
	return nil
}
