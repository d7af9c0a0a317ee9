package sim

import (
	"context"
	"encoding/json"
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

// ControlSocket is the simulator's control socket for an Admin API socket path.
func ControlSocket(adminSocket string) string { return adminSocket + ".control" }

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
		if w.rq, err = newRealQrexec(cfg.RealQrexec, filepath.Join(cfg.Dir, "qrexec"), s.toolsDir, s.bwrap, ControlSocket(cfg.Socket), cfg.ToolsBinary); err != nil {
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
	os.Remove(ControlSocket(cfg.Socket))
	if s.control, err = net.Listen("unix", ControlSocket(cfg.Socket)); err != nil {
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

// ctlRequest is one control socket request (JSON, one line).
type ctlRequest struct {
	Op      string `json:"op"`
	VM      string `json:"vm,omitempty"`
	User    string `json:"user,omitempty"`
	Cmdline string `json:"cmdline,omitempty"`
	Wait    int    `json:"wait,omitempty"` // qrexec-client -w
	// Ready: the call came through the real qrexec, after qrexec-ready made the qube
	// ready; exec need not do it again.
	Ready bool `json:"ready,omitempty"`

	Image string `json:"image,omitempty"`
	Desc  string `json:"desc,omitempty"`
	Port  string `json:"port,omitempty"`
	RO    bool   `json:"ro,omitempty"`
	Class string `json:"class,omitempty"`
	Count int    `json:"count,omitempty"`

	AdminLatency  time.Duration `json:"admin_latency,omitempty"`
	QrexecLatency time.Duration `json:"qrexec_latency,omitempty"`

	Fault  *Fault       `json:"fault,omitempty"`
	Qrexec *QrexecFault `json:"qrexec,omitempty"`
	Kernel *KernelFault `json:"kernel,omitempty"`
}

type ctlResponse struct {
	Error string `json:"error,omitempty"`
	Exit  int    `json:"exit"`
	Port  string `json:"port,omitempty"`
	Fired string `json:"fired,omitempty"` // wait-fault: which fault fired
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

func (s *Sim) handleControl(c *net.UnixConn) {
	defer c.Close()
	buf := make([]byte, 64<<10)
	oob := make([]byte, syscall.CmsgSpace(3*4))
	n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return
	}
	var files []*os.File
	if oobn > 0 {
		if msgs, err := syscall.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for _, m := range msgs {
				fds, _ := syscall.ParseUnixRights(&m)
				for _, fd := range fds {
					files = append(files, os.NewFile(uintptr(fd), "passed"))
				}
			}
		}
	}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	var req ctlRequest
	if err := json.Unmarshal(buf[:n], &req); err != nil {
		reply(c, ctlResponse{Error: "bad control request"})
		return
	}
	var resp ctlResponse
	if s.real != nil {
		switch req.Op {
		case "fault", "drop-events", "flood":
			reply(c, ctlResponse{Error: fmt.Sprintf("cannot %s: %v", req.Op, ErrRealQubesd)})
			return
		case "add-vm":
			if err := s.real.createVM(req.VM, req.Class, req.User); err != nil {
				resp.Error = err.Error()
			}
			reply(c, resp)
			return
		case "plug", "unplug", "describe":
			// The qube may have been started a moment ago.
			s.real.barrier()
		}
	}
	switch req.Op {
	case "ping":
	case "qrexec-ready":
		// The real qrexec-client is about to reach the qube: what qubesd did (a start,
		// an attach) reaches it first, as Xen's part is done before qubesd answers.
		s.makeReady(req.VM)
	case "restart-qubesd":
		err = s.RestartQubesd()
	case "exec":
		if len(files) != 3 {
			resp.Error = "exec needs stdin, stdout and stderr"
			break
		}
		resp.Exit = s.exec(c, req, files)
	case "plug":
		resp.Port, err = s.Plug(req.VM, req.Image, req.Desc, req.RO)
	case "unplug":
		err = s.Unplug(req.VM, req.Port)
	case "add-vm":
		_, err = s.AddVM(req.VM, req.Class, req.User)
	case "fault":
		if req.Fault == nil {
			err = errors.New("no fault given")
		} else {
			s.AddFault(*req.Fault)
		}
	case "qrexec-fault":
		if req.Qrexec == nil {
			err = errors.New("no qrexec fault given")
		} else {
			s.SetQrexecFault(req.VM, *req.Qrexec)
		}
	case "kernel-fault":
		if req.Kernel == nil {
			err = errors.New("no kernel fault given")
		} else {
			s.AddKernelFault(*req.Kernel)
		}
	case "wait-fault":
		resp.Fired, err = s.WaitFault(time.Duration(req.Count) * time.Second)
	case "release":
		s.Release()
	case "calls":
		resp.Fired = fmt.Sprintf("admin=%d qrexec=%d", s.Calls(), s.qrexecCalls.Load())
		by := s.CallsByMethod()
		for _, m := range slices.Sorted(maps.Keys(by)) {
			resp.Fired += fmt.Sprintf("\n%s=%d", m, by[m])
		}
	case "clear-faults":
		s.ClearFaults()
	case "drop-events":
		s.DropEventStreams()
	case "latency":
		s.SetLatency(req.AdminLatency, req.QrexecLatency)
	case "describe":
		s.SetDescription(qubes.DeviceRef{Backend: req.VM, Port: req.Port}, req.Desc)
	case "flood":
		s.Flood(req.VM, req.Count)
	default:
		err = fmt.Errorf("unknown control operation %q", req.Op)
	}
	if err == nil && s.real != nil && (req.Op == "plug" || req.Op == "unplug" || req.Op == "describe") {
		// The change is in qubesd when the caller hears of it, as after udev settled.
		err = s.real.report()
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
func reply(c net.Conn, v any) { _ = writeJSONLine(c, v) }

// exec runs a qrexec call: the caller's stdio become the sandboxed command's. It returns
// qrexec-client's exit status; the command is killed if the caller goes away.
func (s *Sim) exec(c *net.UnixConn, req ctlRequest, stdio []*os.File) int {
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

// control sends one request to a simulator's control socket (used by the qubes-sim CLI).
func control(adminSocket string, req ctlRequest) (ctlResponse, error) {
	var resp ctlResponse
	if err := jsonCall(ControlSocket(adminSocket), "simulator", req, &resp); err != nil {
		return resp, err
	}
	return resp, resp.err()
}

func (r ctlResponse) err() error {
	if r.Error != "" {
		return errors.New(r.Error)
	}
	return nil
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
	req := ctlRequest{Op: "exec", VM: vm, User: user, Cmdline: cmdline, Ready: ready}
	if wait != "" {
		if _, err := fmt.Sscan(wait, &req.Wait); err != nil {
			fmt.Fprintf(os.Stderr, "qrexec-client: -w: not a number of seconds: %q\n", wait)
			return 2
		}
	}
	conn, err := net.Dial("unix", ControlSocket(socket))
	if err != nil {
		fmt.Fprintf(os.Stderr, "qrexec-client: cannot connect to the simulator: %v\n", err)
		return qubes.ExitQrexecProblem
	}
	defer conn.Close()
	b, _ := json.Marshal(req)
	rights := syscall.UnixRights(0, 1, 2)
	if _, _, err := conn.(*net.UnixConn).WriteMsgUnix(b, rights, nil); err != nil {
		fmt.Fprintf(os.Stderr, "qrexec-client: %v\n", err)
		return qubes.ExitQrexecProblem
	}
	var resp ctlResponse
	if err := readJSONLine(conn, "simulator", &resp); err != nil {
		fmt.Fprintf(os.Stderr, "qrexec-client: %v\n", err)
		return qubes.ExitQrexecProblem
	}
	if err := resp.err(); err != nil {
		fmt.Fprintf(os.Stderr, "qrexec-client: %v\n", err)
		return qubes.ExitQrexecProblem
	}
	return resp.Exit
}

// Ping answers once the simulator at adminSocket is ready: its world is complete.
func Ping(adminSocket string) error {
	_, err := control(adminSocket, ctlRequest{Op: "ping"})
	return err
}
