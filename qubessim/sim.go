package qubessim

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/qcrypt/qcrypt/qubessim/control"
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

// Ping answers once the simulator at adminSocket is ready: its world is complete.
func Ping(adminSocket string) error {
	_, err := control.Call(adminSocket, control.Request{Op: control.Ping})
	return err
}
