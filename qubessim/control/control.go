// Package control is the protocol of the simulator's control socket (the Admin API
// socket's path plus ".control"): the qubes-sim CLI, the stand-in qrexec-client and
// tests use it to change the world (plug a disk, inject a fault) and to run commands in
// qubes. One JSON request, one JSON answer line, one connection per request; an exec
// request passes the caller's stdin, stdout and stderr with it.
//
// Every operation is declared once, in ops: its command-line form and its parser. The
// server decodes a request once (Read) and gets it checked against the same table.
package control

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/qcrypt/qcrypt/qubessim/internal/jsonline"
	"github.com/qcrypt/qcrypt/qubessim/kernelcall"
)

// Op is a control operation.
type Op string

// The control operations.
const (
	Ping          Op = "ping"           // answers once the world is ready
	QrexecReady   Op = "qrexec-ready"   // what qubesd did reaches the qube (before the real qrexec-client)
	Exec          Op = "exec"           // a qrexec call; stdio passed with the request
	AddVM         Op = "add-vm"         // a halted qube
	Plug          Op = "plug"           // a disk appears in a qube
	Unplug        Op = "unplug"         // a disk is pulled
	Describe      Op = "describe"       // a device's description changes
	SetFault      Op = "fault"          // an Admin API call misbehaves
	SetQrexec     Op = "qrexec-fault"   // qrexec calls into a qube misbehave
	SetKernel     Op = "kernel-fault"   // a block operation in a qube misbehaves, once
	WaitFault     Op = "wait-fault"     // waits until a fault fires
	Release       Op = "release"        // held calls go on
	ClearFaults   Op = "clear-faults"   // all faults end
	Calls         Op = "calls"          // the Admin API and qrexec calls served so far
	Latency       Op = "latency"        // every later call waits this long
	DropEvents    Op = "drop-events"    // the event streams end
	Flood         Op = "flood"          // a burst of device-list events
	RestartQubesd Op = "restart-qubesd" // as `systemctl restart qubesd`
)

// Request is one control request.
type Request struct {
	Op      Op     `json:"op"`
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

// Response is the answer to a request.
type Response struct {
	Error string `json:"error,omitempty"`
	Exit  int    `json:"exit"`
	Port  string `json:"port,omitempty"`
	Fired string `json:"fired,omitempty"` // wait-fault: which fault fired; calls: the counts
}

// Err is the request's failure, or nil.
func (r Response) Err() error {
	if r.Error != "" {
		return errors.New(r.Error)
	}
	return nil
}

// Fault makes Admin API calls misbehave.
type Fault struct {
	Method string        // exact method name, e.g. "admin.vm.device.block.Attach"
	Dest   string        // only calls to this qube; "" matches all
	Empty  bool          // answer with an empty response
	Type   string        // answer with this exception type ...
	Msg    string        // ... and message
	Delay  time.Duration // wait before answering (or before the fault's answer)
	Count  int           // fire this many times; 0 = until removed
	// Held makes the call wait until Release (or a restart of qubesd, which drops it
	// unanswered): with WaitFault, how tests through the control socket stop an
	// operation at one call.
	Held bool
	// In-process tests make a fault deterministic with these: Reached is called when the
	// fault fires, and the call is answered only once Hold is closed.
	Reached func()          `json:"-"`
	Hold    <-chan struct{} `json:"-"`
}

// KernelFault makes one kind of block operation in a qube misbehave, once: the fake
// tool's call hangs until Release (or the qube dies, or the tool is killed), or fails.
type KernelFault struct {
	VM   string
	Op   kernelcall.Op // loop-setup, loop-detach, crypt-open, crypt-close, mount, umount
	Hang bool
	Fail bool
}

// QrexecFault changes how commands in one qube behave.
type QrexecFault struct {
	Hang      bool   // qrexec-client never returns (until killed or the qube dies)
	Exit      int    // qrexec-client exits with this status without running anything
	StartFail string // admin.vm.Start fails with domain-start-failed and this reason
}

// maxRequest bounds a control request, which is read in one message (its descriptors
// come with it): a few names, a command line, a fault.
const maxRequest = 64 << 10

// Socket is the control socket of the simulator serving adminSocket.
func Socket(adminSocket string) string { return adminSocket + ".control" }

// Call sends one request (not exec) to the simulator serving adminSocket.
func Call(adminSocket string, req Request) (Response, error) {
	var resp Response
	if err := jsonline.Call(Socket(adminSocket), "simulator", req, &resp); err != nil {
		return resp, err
	}
	return resp, resp.Err()
}

// CallExec sends an exec request with this process's stdin, stdout and stderr.
func CallExec(adminSocket string, req Request) (Response, error) {
	var resp Response
	conn, err := net.Dial("unix", Socket(adminSocket))
	if err != nil {
		return resp, fmt.Errorf("cannot connect to the simulator: %w", err)
	}
	defer conn.Close()
	b, err := json.Marshal(req)
	if err != nil {
		return resp, err
	}
	if _, _, err := conn.(*net.UnixConn).WriteMsgUnix(b, syscall.UnixRights(0, 1, 2), nil); err != nil {
		return resp, fmt.Errorf("cannot send to the simulator: %w", err)
	}
	if err := jsonline.Read(conn, &resp); err != nil {
		return resp, fmt.Errorf("simulator closed the connection: %w", err)
	}
	return resp, resp.Err()
}

// Read reads one request and the descriptors passed with it (exec's stdio), decoded and
// checked: a request that fails its check is refused before the server sees it.
func Read(c *net.UnixConn) (Request, []*os.File, error) {
	buf := make([]byte, maxRequest)
	oob := make([]byte, syscall.CmsgSpace(3*4))
	n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return Request{}, nil, err
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
	var req Request
	if err := json.Unmarshal(buf[:n], &req); err != nil {
		return req, files, errors.New("bad control request")
	}
	return req, files, req.check(len(files))
}

// check says whether a decoded request has what its operation needs.
func (r Request) check(passed int) error {
	spec, ok := ops[r.Op]
	if !ok {
		return fmt.Errorf("unknown control operation %q", r.Op)
	}
	switch {
	case spec.stdio && passed != 3:
		return fmt.Errorf("%s needs stdin, stdout and stderr", r.Op)
	case r.Op == SetFault && r.Fault == nil:
		return errors.New("no fault given")
	case r.Op == SetQrexec && r.Qrexec == nil:
		return errors.New("no qrexec fault given")
	case r.Op == SetKernel && r.Kernel == nil:
		return errors.New("no kernel fault given")
	}
	return nil
}

// OwnServerOnly says whether op needs the simulator's own Admin API server (it changes
// what qubesd does, which the real qubesd does not let it).
func OwnServerOnly(op Op) bool { return ops[op].ownServer }

// ChangesDevices says whether op changes a qube's block devices, which a real qubesd
// hears of before the caller gets its answer.
func ChangesDevices(op Op) bool { return ops[op].devices }
