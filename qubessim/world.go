// Package qubessim is a qubesd simulator: it serves the Admin API wire protocol on a
// unix socket with the behaviour of Qubes R4.2 or R4.3, keeps a world of qubes, block
// devices and attachments, and runs commands "in" qubes through a qrexec-client
// compatible entry point. Qubes run on one of two backends: bubblewrap sandboxes whose
// block tools (losetup, cryptsetup, mount, ...) are faithful fakes acting on an
// in-memory kernel per qube (memkernel), or namespaces on the host's real kernel with
// the real tools. With the real qubesd (../shared/real-qubesd) it plays Xen and the
// qubes' agents instead of serving the Admin API itself (realqubesd.go), and with the
// real qrexec it runs the real agent and daemon (realqrexec.go).
//
// Its rooms, one package per side of a process boundary:
//
//	qubessim            the world, the Admin API server, faults, the backends, the CLI
//	qubessim/control    the control socket's protocol (qubes-sim ctl, qrexec-client)
//	qubessim/kernelcall the fake tools' calls to a qube's in-memory kernel
//	qubessim/memkernel  that kernel: loop, dm-crypt, mounts, and the fake formats
//	qubessim/inqube     what runs inside a qube: fake tools, sandbox-init, the holder
//	qubessim/simtest    worlds for tests
package qubessim

import (
	"crypto/sha256"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/control"
	"github.com/qcrypt/qcrypt/qubessim/memkernel"
)

// Dialect selects the Qubes release whose behaviour the simulator copies.
type Dialect string

// The Qubes releases the simulator speaks as.
const (
	R42 Dialect = "4.2" // old device API: Available/List, no device-added/removed
	R43 Dialect = "4.3" // new device API: Available/Attached, key='value' lines
)

// VM is a simulated qube.
type VM struct {
	Name          string
	Class         string
	State         string
	DefaultUser   string
	QrexecTimeout int

	root   string            // host directory that is the qube's "/"
	kernel *memkernel.Kernel // the sandbox backend's
	procs  map[*exec.Cmd]struct{}
	halted chan struct{} // closed and replaced when the qube halts
	// booting is closed when a start under way ends; another start waits for it, as
	// qubesd's startup_lock makes it.
	booting chan struct{}
	qrexec  *qrexecProcs // the real qrexec's agent and daemon while it runs (Config.RealQrexec)
	// announced is R4.3 qubesd's device cache of this backend: what it last reported.
	announced map[string]bool
}

// UUID is derived from the name so that answers are reproducible.
func (vm *VM) UUID() string { return UUIDFor(vm.Name) }

// UUIDFor is the uuid the simulator gives a qube of that name.
func UUIDFor(name string) string {
	if name == "dom0" {
		return "00000000-0000-0000-0000-000000000000"
	}
	h := sha256.Sum256([]byte("qubes-sim:" + name))
	h[6] = h[6]&0x0f | 0x40
	h[8] = h[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", h[0:4], h[4:6], h[6:8], h[8:10], h[10:16])
}

// Root is the host directory that holds the qube's file system.
func (vm *VM) Root() string { return vm.root }

func (vm *VM) running() bool { return qubes.IsRunning(vm.State) }

// Attachment is a block device of a backend attached to a frontend.
type Attachment struct {
	qubes.DeviceRef
	Frontend    string
	ReadOnly    bool
	FrontendDev string
	// Stale is set when the backend shut down while attached: the frontend still lists
	// the disk (R4.1/R4.2 send no event) and detaching it triggers Qubes bug #4784.
	Stale bool
}

// World is the simulated Qubes system. All fields are guarded by mu.
type World struct {
	mu          sync.Mutex
	dialect     Dialect
	dir         string
	vms         map[string]*VM
	attachments []*Attachment
	subs        map[*subscriber]struct{}
	faults      []*control.Fault
	qrexec      map[string]control.QrexecFault
	descs       map[qubes.DeviceRef]string // hostile description overrides
	// wedged models Qubes bug #4784: after a detach from a dead backend, every device
	// call of qubesd fails until it is restarted.
	wedged bool
	// Bug4784 enables that model (default on).
	Bug4784 bool

	StartDelay           time.Duration
	ShutdownDelay        time.Duration
	DefaultQrexecTimeout int

	// adminLatency and qrexecLatency are waited in every Admin API call (but the event
	// stream) and every stand-in qrexec call: a real machine's latencies (SetLatency).
	adminLatency, qrexecLatency time.Duration

	calls   int64            // Admin API calls served
	callsBy map[string]int64 // the same per method

	kfaults  []control.KernelFault
	firedCh  chan string   // faults that fired, for WaitFault
	release  chan struct{} // closed by Release: held calls go on
	restarts int           // RestartQubesd calls: a held call of an earlier one is dropped

	backend backend     // how qubes run
	rq      *realQrexec // the real qrexec; nil: the stand-in qrexec-client only

	// Log receives a line per qube that powers off, and one per device it still served
	// to a running qube then (a layer taken from under the qube above); nil: none.
	Log io.Writer
}

// NewWorld creates an empty world (only dom0) whose qube trees live under dir.
func NewWorld(dir string, dialect Dialect) (*World, error) {
	if dialect != R42 && dialect != R43 {
		return nil, fmt.Errorf("cannot simulate Qubes %q: use 4.2 or 4.3", dialect)
	}
	w := &World{
		dialect: dialect, dir: dir,
		vms: map[string]*VM{}, subs: map[*subscriber]struct{}{},
		qrexec: map[string]control.QrexecFault{}, descs: map[qubes.DeviceRef]string{},
		Bug4784: true, DefaultQrexecTimeout: 60,
		firedCh: make(chan string, 256), release: make(chan struct{}),
		ShutdownDelay: 20 * time.Millisecond,
	}
	if _, err := w.AddVM("dom0", "AdminVM", "user"); err != nil {
		return nil, err
	}
	w.vms["dom0"].State = qubes.StateRunning
	return w, nil
}

// Dialect is the simulated release.
func (w *World) Dialect() Dialect { return w.dialect }

// AddVM creates a halted qube with an empty home for user.
func (w *World) AddVM(name, class, user string) (*VM, error) {
	if err := qubes.ValidateVMName(name); err != nil {
		return nil, err
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if _, ok := w.vms[name]; ok {
		return nil, fmt.Errorf("cannot add qube %s: it exists", name)
	}
	vm := &VM{Name: name, Class: class, State: qubes.StateHalted, DefaultUser: user, QrexecTimeout: 60,
		root: filepath.Join(w.dir, "qubes", name), procs: map[*exec.Cmd]struct{}{}, halted: make(chan struct{})}
	for _, d := range []string{"home/" + user + "/.qcrypt/keys", "rw", "tmp", "mnt", "root"} {
		if err := os.MkdirAll(filepath.Join(vm.root, d), 0o755); err != nil {
			return nil, fmt.Errorf("cannot create qube %s: %w", name, err)
		}
	}
	vm.kernel = memkernel.New(kernelHost{w, vm})
	w.vms[name] = vm
	w.emit("", "domain-add", "vm", name)
	return vm, nil
}

// VM returns a qube by name.
func (w *World) VM(name string) (*VM, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	vm, ok := w.vms[name]
	return vm, ok
}

// sortedVMs lists qubes dom0 first, then by name (as R4.3+ does; R4.2 sorts by name,
// which gives the same order for names that sort after "dom0").
func (w *World) sortedVMs() []*VM {
	out := make([]*VM, 0, len(w.vms))
	for _, vm := range w.vms {
		out = append(out, vm)
	}
	sort.Slice(out, func(i, j int) bool {
		if (out[i].Name == "dom0") != (out[j].Name == "dom0") {
			return out[i].Name == "dom0"
		}
		return out[i].Name < out[j].Name
	})
	return out
}

// Calls is the number of Admin API requests served.
func (w *World) Calls() int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.calls
}

// CallsByMethod is Calls per Admin API method.
func (w *World) CallsByMethod() map[string]int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return maps.Clone(w.callsBy)
}

// attachmentsOf returns attachments whose frontend is vm.
func (w *World) attachmentsOf(frontend string) []*Attachment {
	var out []*Attachment
	for _, a := range w.attachments {
		if a.Frontend == frontend {
			out = append(out, a)
		}
	}
	return out
}

func (w *World) attachmentOf(dev qubes.DeviceRef) *Attachment {
	for _, a := range w.attachments {
		if a.DeviceRef == dev && !a.Stale {
			return a
		}
	}
	return nil
}

func (w *World) removeAttachment(a *Attachment) {
	for i, x := range w.attachments {
		if x == a {
			w.attachments = append(w.attachments[:i], w.attachments[i+1:]...)
			return
		}
	}
}

// frontendDev picks the first free xvdX as qubesd does (qubes.FrontendSlots); with none
// free, qubesd's libvirt call fails: an empty response.
func (w *World) frontendDev(frontend string) (string, error) {
	used := map[string]bool{}
	for _, a := range w.attachmentsOf(frontend) {
		used[a.FrontendDev] = true
	}
	api := qubes.DeviceAPINew
	if w.dialect == R42 {
		api = qubes.DeviceAPIOld
	}
	for _, c := range qubes.FrontendSlots(api) {
		if !used[c] {
			return c, nil
		}
	}
	return "", errEmpty
}

// description of an exposed device: what the backend's udev script would write to
// QubesDB, unless a test installed a hostile override.
func (w *World) description(dev qubes.DeviceRef, own string) string {
	if d, ok := w.descs[dev]; ok {
		return d
	}
	return own
}

// published lists the block devices a running qube exposes, sorted by name.
func (w *World) published(vm *VM) []devInfo { return w.backend.exposed(vm) }

// sanitizeOld is R4.1/R4.2 qubesd's per-byte description filter.
func sanitizeOld(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !descAllowed(c) {
			b[i] = '_'
		}
	}
	return string(b)
}

// sanitizeNew is R4.3's: non-ASCII bytes are dropped, other bad characters become '_'.
func sanitizeNew(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x80 {
			continue
		}
		if !descAllowed(c) {
			c = '_'
		}
		b.WriteByte(c)
	}
	return b.String()
}

func descAllowed(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("()+,-.:=_/ ", c) >= 0
}

// logf writes a line to Log.
func (w *World) logf(format string, a ...any) {
	if w.Log != nil {
		fmt.Fprintf(w.Log, "qubes-sim: "+format+"\n", a...)
	}
}

// devInfo is a block device a qube publishes (what its udev script would report).
type devInfo struct {
	name, desc string
	parent     string // the disk of a partition (QubesDB's parent)
	size       int64
	ro         bool
	major      uint32
	minor      uint32
}
