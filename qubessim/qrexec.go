// The stand-in qrexec: a call runs its command in the qube's sandbox with the caller's stdio.

package qubessim

import (
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/control"
)

// exec runs a qrexec call: the caller's stdio become the sandboxed command's. It returns
// qrexec-client's exit status; the command is killed if the caller goes away.
func (s *Sim) exec(c *net.UnixConn, req control.Request, stdio []*os.File) int {
	gone := closedByPeer(c)
	s.qrexecCalls.Add(1)
	s.World.mu.Lock()
	latency := s.World.qrexecLatency
	s.World.mu.Unlock()
	time.Sleep(latency)
	wait := time.Duration(req.Wait) * time.Second
	if req.Wait <= 0 {
		wait = 5 * time.Second
	}
	argv, ok := parseCmdline(req.Cmdline)
	if s.real != nil {
		if !req.Ready {
			s.makeReady(req.VM)
		}
		// What the command did to block devices reaches qubesd, as udev would report it.
		defer func() { s.real.logErr(s.real.report()) }()
	}
	s.World.mu.Lock()
	vm, exists := s.World.vms[req.VM]
	fault := s.World.qrexec[req.VM]
	var halted chan struct{}
	if exists {
		halted = vm.halted
		if !vm.running() {
			fault.Hang = false // no agent to hang: the call fails below
		}
	}
	s.World.mu.Unlock()
	switch {
	case !exists:
		fmt.Fprintf(stdio[2], "Failed to connect to qrexec daemon of %s\n", req.VM)
		return qubes.ExitQrexecProblem
	case fault.Hang:
		// The agent never answers; the call ends when the caller gives up or the
		// qube dies (the vchan closes).
		select {
		case <-gone:
		case <-halted:
		}
		return qubes.ExitQrexecProblem
	case fault.Exit != 0:
		return fault.Exit
	}
	// A paused qube's agent does not answer: wait for it up to the connect timeout.
	deadline := time.Now().Add(wait)
	for {
		s.World.mu.Lock()
		state := vm.State
		s.World.mu.Unlock()
		if state == qubes.StateRunning {
			break
		}
		if state != qubes.StatePaused || time.Now().After(deadline) {
			fmt.Fprintf(stdio[2], "qrexec-client: cannot connect to %s: domain not running\n", req.VM)
			return qubes.ExitQrexecProblem
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !ok {
		return qubes.ExitQrexecNotFound
	}
	home := "/root"
	if req.User != "root" {
		home = "/home/" + vm.DefaultUser
	}
	s.World.mu.Lock()
	cmd := s.World.backend.command(vm, home, argv)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = stdio[0], stdio[1], stdio[2]
	if err := cmd.Start(); err != nil {
		s.World.mu.Unlock()
		fmt.Fprintf(stdio[2], "qubes-sim: cannot start sandbox: %v\n", err)
		return qubes.ExitQrexecProblem
	}
	vm.procs[cmd] = struct{}{}
	s.World.mu.Unlock()

	done := make(chan struct{})
	go func() {
		select {
		case <-gone:
			killGroup(cmd)
		case <-done:
		}
	}()
	_ = cmd.Wait() // its status is read from cmd.ProcessState below
	close(done)
	s.World.mu.Lock()
	delete(vm.procs, cmd)
	s.World.backend.commandDone(vm)
	s.World.mu.Unlock()
	select {
	case <-halted:
		// The qube died during the call: the real qrexec-client sees the vchan close
		// before an exit status and exits 255.
		fmt.Fprintf(stdio[2], "qrexec-client: vchan connection closed early\n")
		return qubes.ExitQrexecLost
	default:
	}
	st := cmd.ProcessState
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return st.ExitCode()
}

// QrexecClient is the qrexec-client compatible entry point: it parses the real tool's
// argv (after "--socket S"), passes its stdio to the simulator and exits with the
// remote status.
func QrexecClient(args []string) int {
	socket := qubes.DefaultSocket
	var vm, wait string
	var ready bool
	var rest []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		next := func() string {
			if i+1 < len(args) {
				i++
				return args[i]
			}
			return ""
		}
		switch {
		case a == "--socket":
			socket = next()
		case a == "-d":
			vm = next()
		case a == "--ready":
			ready = true
		case a == "-w":
			wait = next()
		case a == "-t" || a == "-T" || a == "-E":
			// filtering and no-exit-code are not simulated
			if a == "-E" {
				fmt.Fprintln(os.Stderr, "qrexec-client: not supported by the simulator: -E")
				return 2
			}
		case strings.HasPrefix(a, "-"):
			fmt.Fprintf(os.Stderr, "qrexec-client: not supported by the simulator: %s\n", a)
			return 2
		default:
			rest = append(rest, a)
		}
	}
	if vm == "" || len(rest) != 1 {
		fmt.Fprintln(os.Stderr, "usage: qrexec-client [--socket S] -d VM [-w SECS] USER:CMDLINE")
		return 2
	}
	user, cmdline, ok := strings.Cut(rest[0], ":")
	if !ok {
		fmt.Fprintln(os.Stderr, "qrexec-client: command line must be USER:CMDLINE")
		return 2
	}
	req := control.Request{Op: control.Exec, VM: vm, User: user, Cmdline: cmdline, Ready: ready}
	if wait != "" {
		if _, err := fmt.Sscan(wait, &req.Wait); err != nil {
			fmt.Fprintf(os.Stderr, "qrexec-client: -w: not a number of seconds: %q\n", wait)
			return 2
		}
	}
	resp, err := control.CallExec(socket, req)
	if err != nil {
		fmt.Fprintf(os.Stderr, "qrexec-client: %v\n", err)
		return qubes.ExitQrexecProblem
	}
	return resp.Exit
}
