// The control socket's server: every control.Op served from one table.

package qubessim

import (
	"context"
	"fmt"
	"maps"
	"net"
	"os"
	"slices"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/control"
	"github.com/qcrypt/qcrypt/qubessim/internal/jsonline"
)

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
