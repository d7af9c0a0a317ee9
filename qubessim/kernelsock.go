// The kernel sockets: a qube's fake tools reach its in-memory kernel (memkernel) here.

package qubessim

import (
	"net"
	"os"
	"path/filepath"

	"github.com/qcrypt/qcrypt/qubessim/internal/jsonline"
	"github.com/qcrypt/qcrypt/qubessim/kernelcall"
)

func (s *Sim) serveKernel(vmName string, c net.Conn) {
	defer c.Close()
	var req kernelcall.Request
	var resp kernelcall.Response
	if err := jsonline.Read(c, &req); err != nil {
		resp = kernelcall.Response{Code: 1, Msg: "bad kernel request"}
	} else if failed := s.kernelFault(vmName, req.Op, c); failed != "" {
		resp = kernelcall.Response{Code: 1, Msg: failed}
	} else {
		resp = s.kernelCall(vmName, req)
	}
	reply(c, resp)
}

// kernelFault applies a kernel fault for op in vmName: a hang ends when released (then
// the op runs), when the qube dies or the tool is killed (then it fails). It returns a
// failure message, or "" to run the op.
func (s *Sim) kernelFault(vmName string, op kernelcall.Op, c net.Conn) string {
	w := s.World
	w.mu.Lock()
	f, ok := w.takeKernelFault(vmName, op)
	release := w.release
	var halted chan struct{}
	if vm := w.vms[vmName]; vm != nil {
		halted = vm.halted
	}
	w.mu.Unlock()
	if !ok {
		return ""
	}
	w.fired(string(op) + " " + vmName)
	if f.Fail {
		return "injected failure of " + string(op)
	}
	select {
	case <-release:
		return ""
	case <-halted:
		return "qube is not running"
	case <-closedByPeer(c):
		return "killed"
	}
}

// kernelCall runs one call of a qube's fake tools in its kernel.
func (s *Sim) kernelCall(vmName string, req kernelcall.Request) kernelcall.Response {
	w := s.World
	w.mu.Lock()
	defer w.mu.Unlock()
	vm := w.vms[vmName]
	if !vm.running() {
		return kernelcall.Response{Code: 1, Msg: "qube is not running"}
	}
	return vm.kernel.Call(req)
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
