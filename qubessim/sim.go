package qubessim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/control"
	"github.com/qcrypt/qcrypt/qubessim/internal/jsonline"
)

// Config says where a simulator keeps its state and what it serves.
type Config struct {
	Dir         string  // state directory (qube trees, sockets, tools)
	Dialect     Dialect // R42 (default) or R43
	Socket      string  // Admin API socket; default Dir/qubesd.sock
	ToolsBinary string  // the qubes-sim binary that acts as the fake tools; default this executable
	Bwrap       string  // bubblewrap; default "bwrap" from PATH
	Demo        bool    // build the demo world before serving
	// Backend is how qubes run: BackendSandbox (default: bubblewrap sandboxes with fake
	// block tools) or BackendKernel (namespaces on the real kernel, real tools; root).
	Backend string
	// RealQubesd is the folder holding the real qubesd's start.sh: when set, the Admin
	// API on Socket is that server and the simulator plays Xen and the qubes' agents.
	RealQubesd string
	// RealQrexec is a build of ../shared/real-qrexec (build.sh's OUT): when set, qubes
	// run the real qrexec-agent and dom0 the real qrexec-daemon, reached with the
	// qrexec-client at QrexecClientPath(Dir/qrexec).
	RealQrexec string
	// Log receives the simulator's own messages (default stderr); set, it also gets a
	// line per qube that powers off (World.Log).
	Log io.Writer
}

// The simulator's backends.
const (
	BackendSandbox = "sandbox"
	BackendKernel  = "kernel"
)

// Sim is a running simulator: the world plus its Admin API, control and per-qube kernel
// sockets.
type Sim struct {
	*World
	cfg      Config
	admin    net.Listener
	control  net.Listener
	toolsDir string
	bwrap    string
	real     *realQubesd // nil: the simulator serves the Admin API itself

	mu      sync.Mutex
	kernels map[string]net.Listener
	closed  bool

	qrexecCalls atomic.Int64 // qrexec-client calls served
}

// Start creates the state directory, the world with dom0, and serves the sockets.
func Start(cfg Config) (*Sim, error) {
	if cfg.Dialect == "" {
		cfg.Dialect = R42
	}
	if cfg.Socket == "" {
		cfg.Socket = filepath.Join(cfg.Dir, "qubesd.sock")
	}
	if cfg.ToolsBinary == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("cannot find the simulator binary: %w", err)
		}
		cfg.ToolsBinary = exe
	}
	if cfg.Bwrap == "" {
		cfg.Bwrap = "bwrap"
	}
	if cfg.Backend == "" {
		cfg.Backend = BackendSandbox
	}
	w, err := NewWorld(cfg.Dir, cfg.Dialect)
	if err != nil {
		return nil, err
	}
	w.Log = cfg.Log
	if cfg.Log == nil {
		cfg.Log = os.Stderr
	}
	s := &Sim{World: w, cfg: cfg, toolsDir: filepath.Join(cfg.Dir, "tools"), kernels: map[string]net.Listener{}}
	switch cfg.Backend {
	case BackendSandbox:
		w.backend = &sandboxBackend{s}
		if s.bwrap, err = exec.LookPath(cfg.Bwrap); err != nil {
			return nil, fmt.Errorf("cannot find bubblewrap (apt-get install bubblewrap): %w", err)
		}
		if err := prepareTools(s.toolsDir, cfg.ToolsBinary); err != nil {
			return nil, err
		}
	case BackendKernel:
		if cfg.Demo {
			return nil, errors.New("cannot build the demo world on the kernel backend: its container is in the fake format")
		}
		hk, err := newHostKernel(w, cfg.ToolsBinary, s.toolsDir)
		if err != nil {
			return nil, err
		}
		w.backend = hk
		dom0 := w.vms["dom0"]
		if err := resetRoot(dom0); err != nil {
			return nil, err
		}
		if err := hk.boot(dom0); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("cannot run qubes on backend %q: use %s or %s", cfg.Backend, BackendSandbox, BackendKernel)
	}
	if cfg.RealQrexec != "" {
		if s.bwrap == "" {
			if s.bwrap, err = exec.LookPath(cfg.Bwrap); err != nil {
				return nil, fmt.Errorf("cannot find bubblewrap (apt-get install bubblewrap): %w", err)
			}
		}
		if w.rq, err = newRealQrexec(cfg.RealQrexec, filepath.Join(cfg.Dir, "qrexec"), s.toolsDir, s.bwrap, control.Socket(cfg.Socket), cfg.ToolsBinary); err != nil {
			return nil, err
		}
	}
	if err := w.backend.added(w.vms["dom0"]); err != nil {
		return nil, err
	}
	if cfg.RealQubesd != "" {
		if s.real, err = startRealQubesd(s, cfg.RealQubesd, cfg.Log); err != nil {
			s.Close()
			return nil, err
		}
	}
	if cfg.Demo {
		// Before the Admin API socket exists, so a client never sees half a world (a
		// real qubesd's is there already, but its demo qubes exist from its start).
		if err := s.SetupDemo(); err != nil {
			s.Close()
			return nil, fmt.Errorf("cannot set up the demo world: %w", err)
		}
	}
	if s.real == nil {
		os.Remove(cfg.Socket)
		if s.admin, err = net.Listen("unix", cfg.Socket); err != nil {
			s.Close()
			return nil, fmt.Errorf("cannot listen on %s: %w", cfg.Socket, err)
		}
		go func() { _ = w.ServeAdmin(s.admin) }() // ends when Close closes the listener
	}
	// Last: a client that reaches the control socket finds the world complete.
	os.Remove(control.Socket(cfg.Socket))
	if s.control, err = net.Listen("unix", control.Socket(cfg.Socket)); err != nil {
		s.Close()
		return nil, fmt.Errorf("cannot listen on the control socket: %w", err)
	}
	go s.serveControl()
	return s, nil
}

// RestartQubesd restarts the real qubesd as `systemctl restart qubesd` would; the own
// server drops its event streams and held calls (World.RestartQubesd).
func (s *Sim) RestartQubesd() error {
	if s.real == nil {
		s.World.RestartQubesd()
		return nil
	}
	return s.real.restart()
}

// Socket is the Admin API socket path.
func (s *Sim) Socket() string { return s.cfg.Socket }

// Close stops serving and kills every sandboxed process.
func (s *Sim) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	for _, ln := range s.kernels {
		ln.Close()
	}
	s.mu.Unlock()
	if s.real != nil {
		s.real.close()
	}
	for _, ln := range []net.Listener{s.admin, s.control} {
		if ln != nil {
			ln.Close()
		}
	}
	s.World.mu.Lock()
	for _, vm := range s.World.vms {
		if s.World.rq != nil {
			s.World.rq.stopVM(vm)
		}
		for cmd := range vm.procs {
			killGroup(cmd)
		}
		s.World.backend.teardown(vm, false) // the kernel backend leaves nothing in the kernel
	}
	for s2 := range s.World.subs {
		s.World.dropSubscriber(s2)
	}
	if s.World.rq != nil {
		os.RemoveAll(s.World.rq.sockets)
	}
	s.World.mu.Unlock()
	return nil
}

// AddVM adds a halted qube with its kernel socket.
func (s *Sim) AddVM(name, class, user string) (*VM, error) {
	vm, err := s.World.AddVM(name, class, user)
	if err != nil {
		return nil, err
	}
	s.World.mu.Lock()
	defer s.World.mu.Unlock()
	return vm, s.World.backend.added(vm)
}

func (s *Sim) kernelSocket(vm string) string {
	return filepath.Join(s.cfg.Dir, "run", vm, "kernel.sock")
}

// listenKernel serves a qube's fake kernel to its sandbox.
func (s *Sim) listenKernel(name string) error {
	p := s.kernelSocket(name)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	os.Remove(p)
	ln, err := net.Listen("unix", p)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.kernels[name] = ln
	s.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go s.serveKernel(name, c)
		}
	}()
	return nil
}

func (s *Sim) serveControl() {
	for {
		c, err := s.control.Accept()
		if err != nil {
			return
		}
		go s.handleControl(c.(*net.UnixConn))
	}
}

// controlOp serves one control operation; control.Read has checked the request.
type controlOp func(s *Sim, c *net.UnixConn, req control.Request, stdio []*os.File) (control.Response, error)

var controlOps = map[control.Op]controlOp{
	control.Ping: func(*Sim, *net.UnixConn, control.Request, []*os.File) (control.Response, error) {
		return control.Response{}, nil
	},
	control.QrexecReady: func(s *Sim, _ *net.UnixConn, req control.Request, _ []*os.File) (control.Response, error) {
		// The real qrexec-client is about to reach the qube: what qubesd did (a start,
		// an attach) reaches it first, as Xen's part is done before qubesd answers.
		s.makeReady(req.VM)
		return control.Response{}, nil
	},
	control.Exec: func(s *Sim, c *net.UnixConn, req control.Request, stdio []*os.File) (control.Response, error) {
		return control.Response{Exit: s.exec(c, req, stdio)}, nil
	},
	control.AddVM: func(s *Sim, _ *net.UnixConn, req control.Request, _ []*os.File) (control.Response, error) {
		if s.real != nil {
			return control.Response{}, s.real.createVM(req.VM, req.Class, req.User)
		}
		_, err := s.AddVM(req.VM, req.Class, req.User)
		return control.Response{}, err
	},
	control.Plug: func(s *Sim, _ *net.UnixConn, req control.Request, _ []*os.File) (control.Response, error) {
		port, err := s.Plug(req.VM, req.Image, req.Desc, req.RO)
		return control.Response{Port: port}, err
	},
	control.Unplug: func(s *Sim, _ *net.UnixConn, req control.Request, _ []*os.File) (control.Response, error) {
		return control.Response{}, s.Unplug(req.VM, req.Port)
	},
	control.Describe: func(s *Sim, _ *net.UnixConn, req control.Request, _ []*os.File) (control.Response, error) {
		s.SetDescription(qubes.DeviceRef{Backend: req.VM, Port: req.Port}, req.Desc)
		return control.Response{}, nil
	},
	control.SetFault: func(s *Sim, _ *net.UnixConn, req control.Request, _ []*os.File) (control.Response, error) {
		s.AddFault(*req.Fault)
		return control.Response{}, nil
	},
	control.SetQrexec: func(s *Sim, _ *net.UnixConn, req control.Request, _ []*os.File) (control.Response, error) {
		s.SetQrexecFault(req.VM, *req.Qrexec)
		return control.Response{}, nil
	},
	control.SetKernel: func(s *Sim, _ *net.UnixConn, req control.Request, _ []*os.File) (control.Response, error) {
		s.AddKernelFault(*req.Kernel)
		return control.Response{}, nil
	},
	control.WaitFault: func(s *Sim, _ *net.UnixConn, req control.Request, _ []*os.File) (control.Response, error) {
		fired, err := s.WaitFault(time.Duration(req.Count) * time.Second)
		return control.Response{Fired: fired}, err
	},
	control.Release: func(s *Sim, _ *net.UnixConn, _ control.Request, _ []*os.File) (control.Response, error) {
		s.Release()
		return control.Response{}, nil
	},
	control.ClearFaults: func(s *Sim, _ *net.UnixConn, _ control.Request, _ []*os.File) (control.Response, error) {
		s.ClearFaults()
		return control.Response{}, nil
	},
	control.Calls: func(s *Sim, _ *net.UnixConn, _ control.Request, _ []*os.File) (control.Response, error) {
		counts := fmt.Sprintf("admin=%d qrexec=%d", s.Calls(), s.qrexecCalls.Load())
		by := s.CallsByMethod()
		for _, m := range slices.Sorted(maps.Keys(by)) {
			counts += fmt.Sprintf("\n%s=%d", m, by[m])
		}
		return control.Response{Fired: counts}, nil
	},
	control.Latency: func(s *Sim, _ *net.UnixConn, req control.Request, _ []*os.File) (control.Response, error) {
		s.SetLatency(req.AdminLatency, req.QrexecLatency)
		return control.Response{}, nil
	},
	control.DropEvents: func(s *Sim, _ *net.UnixConn, _ control.Request, _ []*os.File) (control.Response, error) {
		s.DropEventStreams()
		return control.Response{}, nil
	},
	control.Flood: func(s *Sim, _ *net.UnixConn, req control.Request, _ []*os.File) (control.Response, error) {
		s.Flood(req.VM, req.Count)
		return control.Response{}, nil
	},
	control.RestartQubesd: func(s *Sim, _ *net.UnixConn, _ control.Request, _ []*os.File) (control.Response, error) {
		return control.Response{}, s.RestartQubesd()
	},
}

func (s *Sim) handleControl(c *net.UnixConn) {
	defer c.Close()
	req, stdio, err := control.Read(c)
	defer func() {
		for _, f := range stdio {
			f.Close()
		}
	}()
	if err != nil {
		reply(c, control.Response{Error: err.Error()})
		return
	}
	var resp control.Response
	switch {
	case s.real != nil && control.OwnServerOnly(req.Op):
		err = fmt.Errorf("cannot %s: %w", req.Op, ErrRealQubesd)
	case s.real != nil && control.ChangesDevices(req.Op):
		// The qube may have been started a moment ago; the change is in qubesd when
		// the caller hears of it, as after udev settled.
		s.real.barrier()
		if resp, err = controlOps[req.Op](s, c, req, stdio); err == nil {
			err = s.real.report()
		}
	default:
		resp, err = controlOps[req.Op](s, c, req, stdio)
	}
	if err != nil {
		resp.Error = err.Error()
	}
	reply(c, resp)
}

// closedByPeer is closed when the peer of c, which sends nothing more, goes away (EOF
// or an error): a qrexec-client or a fake tool that was killed.
func closedByPeer(c net.Conn) <-chan struct{} {
	gone := make(chan struct{})
	go func() {
		var b [1]byte
		_, _ = c.Read(b[:]) // any answer, EOF or error alike, means gone
		close(gone)
	}()
	return gone
}

// makeReady makes what qubesd did before a call (a start, an attach) reach the qube,
// and reads the qube back once more in case an event did not show it all. With the
// simulator's own qubesd that is so already.
func (s *Sim) makeReady(vm string) {
	if s.real != nil {
		s.real.barrier()
		s.real.logErr(s.real.syncVM(context.Background(), vm))
	}
}

// reply answers a request; a peer that went away does not need the answer.
func reply(c net.Conn, v any) { _ = jsonline.Write(c, v) }

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

// Plug attaches a disk image to a running qube as its next sdX device, as a USB disk
// plugged into sys-usb. desc is what its udev would report ("MODEL (LABEL)"); empty
// means derived from the image's file system label.
func (s *Sim) Plug(vmName, image, desc string, ro bool) (string, error) {
	s.World.mu.Lock()
	defer s.World.mu.Unlock()
	vm, ok := s.World.vms[vmName]
	if !ok || !vm.running() {
		return "", fmt.Errorf("cannot plug a disk into %s: not running", vmName)
	}
	return s.World.backend.plug(vm, image, desc, ro)
}

// Unplug pulls a disk out: mounts of it are lost (not written back), like yanking a stick.
func (s *Sim) Unplug(vmName, port string) error {
	s.World.mu.Lock()
	defer s.World.mu.Unlock()
	vm, ok := s.World.vms[vmName]
	if !ok {
		return fmt.Errorf("cannot unplug from %s: no such qube", vmName)
	}
	return s.World.backend.unplug(vm, port)
}

// Flood emits n device-list-change events for a qube (a hostile backend toggling).
func (s *Sim) Flood(vmName string, n int) {
	s.World.mu.Lock()
	defer s.World.mu.Unlock()
	if vm, ok := s.World.vms[vmName]; ok {
		for i := 0; i < n; i++ {
			s.World.deviceListChanged(vm)
		}
	}
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

// Ping answers once the simulator at adminSocket is ready: its world is complete.
func Ping(adminSocket string) error {
	_, err := control.Call(adminSocket, control.Request{Op: control.Ping})
	return err
}
