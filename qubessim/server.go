package qubessim

import (
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
)

// exception is a Qubes exception sent as "2\0TYPE\0\0MSG\0".
type exception struct{ typ, msg string }

func (e *exception) Error() string { return e.typ + ": " + e.msg }

// errEmpty makes the server close the connection without a byte, which is how R4.1–R4.3
// report ProtocolError, PermissionDenied and every non-Qubes exception.
var errEmpty = errors.New("empty response")

func excVMNotFound(name string) error {
	return &exception{"QubesVMNotFoundError", "No such domain: " + quoteName(name)}
}

// ServeAdmin answers Admin API connections on ln until it is closed.
func (w *World) ServeAdmin(ln net.Listener) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		go w.handleConn(c)
	}
}

func (w *World) handleConn(c net.Conn) {
	defer c.Close()
	raw, err := io.ReadAll(io.LimitReader(c, qubes.MaxRequest+1))
	if err != nil || len(raw) > qubes.MaxRequest {
		return // "request too long" / broken connection: abort without answer
	}
	req, src, err := qubes.ParseRequest(raw)
	if err != nil {
		return // framing error
	}
	w.mu.Lock()
	w.calls++
	if w.callsBy == nil {
		w.callsBy = map[string]int64{}
	}
	w.callsBy[req.Method]++
	_, srcOK := w.vms[src]
	_, destOK := w.vms[req.Dest]
	latency := w.adminLatency
	w.mu.Unlock()
	if req.Method != "admin.Events" {
		time.Sleep(latency) // spent waiting, as a field machine's qubesd takes it
	}
	if !srcOK {
		write(c, qubes.EncodeException("QubesVMNotFoundError", "No such domain: "+quoteName(src)))
		return
	}
	if !destOK {
		write(c, qubes.EncodeException("QubesVMNotFoundError", "No such domain: "+quoteName(req.Dest)))
		return
	}
	if f := w.takeFault(req.Method, req.Dest); f != nil {
		w.mu.Lock()
		release, restarts := w.release, w.restarts
		w.mu.Unlock()
		w.fired(req.Method + " " + req.Dest)
		if f.Reached != nil {
			f.Reached()
		}
		if f.Hold != nil {
			<-f.Hold
		}
		if f.Held {
			<-release
			w.mu.Lock()
			dropped := w.restarts != restarts
			w.mu.Unlock()
			if dropped {
				return // qubesd restarted under the call: no answer
			}
		}
		time.Sleep(f.Delay)
		switch {
		case f.Empty:
			return
		case f.Type != "":
			write(c, qubes.EncodeException(f.Type, f.Msg))
			return
		}
	}
	if req.Method == "admin.Events" {
		w.serveEvents(c, req)
		return
	}
	body, err := w.dispatch(req)
	var exc *exception
	switch {
	case err == nil:
		write(c, qubes.EncodeOK([]byte(body)))
	case errors.As(err, &exc):
		write(c, qubes.EncodeException(exc.typ, exc.msg))
	default:
		// errEmpty and anything unexpected: close without a byte.
	}
}

// write sends a whole answer; a client that went away does not need it.
func write(c net.Conn, b []byte) {
	_, _ = c.Write(b)
	if uc, ok := c.(*net.UnixConn); ok {
		_ = uc.CloseWrite()
	}
}

func (w *World) serveEvents(c net.Conn, req qubes.Request) {
	if req.Arg != "" || len(req.Payload) != 0 {
		return
	}
	s := &subscriber{ch: make(chan []byte, 4096), gone: make(chan struct{})}
	if req.Dest != "dom0" {
		s.dest = req.Dest
	}
	w.mu.Lock()
	w.subs[s] = struct{}{}
	w.mu.Unlock()
	defer func() {
		w.mu.Lock()
		w.dropSubscriber(s)
		w.mu.Unlock()
	}()
	if _, err := c.Write(qubes.EncodeEvent("", "connection-established")); err != nil {
		return
	}
	for {
		select {
		case rec := <-s.ch:
			if _, err := c.Write(rec); err != nil {
				return
			}
		case <-s.gone:
			return
		}
	}
}

// deviceMethods fail while qubesd is wedged by bug #4784.
func isDeviceMethod(m string) bool { return strings.HasPrefix(m, "admin.vm.device.") }

func (w *World) dispatch(req qubes.Request) (string, error) {
	w.mu.Lock()
	wedged := w.wedged
	w.mu.Unlock()
	if wedged && isDeviceMethod(req.Method) {
		return "", errEmpty
	}
	noArgs := req.Arg == "" && len(req.Payload) == 0
	switch req.Method {
	case "admin.vm.List":
		if !noArgs {
			return "", errEmpty
		}
		return w.list(req.Dest), nil
	case "admin.vm.feature.Set":
		// Only for the event barrier of tools and tests: the change is announced, not kept.
		if req.Arg == "" || req.Dest != "dom0" {
			return "", errEmpty
		}
		w.mu.Lock()
		w.emit("dom0", "domain-feature-pre-set:"+req.Arg, "feature", req.Arg, "value", string(req.Payload))
		w.emit("dom0", "domain-feature-set:"+req.Arg, "feature", req.Arg, "value", string(req.Payload))
		w.mu.Unlock()
		return "", nil
	case "admin.vm.CurrentState":
		if !noArgs {
			return "", errEmpty
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		vm := w.vms[req.Dest]
		if !vm.running() {
			// As libvirt reports a domain that does not exist (real qubesd, both releases).
			return "mem=0 mem_static_max=0 cputime=0 power_state=" + vm.State, nil
		}
		return "mem=4096000 mem_static_max=4096000 cputime=1 power_state=" + vm.State, nil
	case "admin.vm.Start":
		if !noArgs {
			return "", errEmpty
		}
		return "", w.start(req.Dest)
	case "admin.vm.Shutdown":
		if len(req.Payload) != 0 {
			return "", errEmpty
		}
		return "", w.shutdown(req.Dest, req.Arg)
	case "admin.vm.Kill":
		if !noArgs {
			return "", errEmpty
		}
		return "", w.kill(req.Dest)
	case "admin.vm.Pause":
		if !noArgs {
			return "", errEmpty
		}
		return "", w.pause(req.Dest)
	case "admin.vm.Unpause":
		if !noArgs {
			return "", errEmpty
		}
		return "", w.unpause(req.Dest)
	case "admin.vm.property.Get":
		if req.Arg == "" || len(req.Payload) != 0 {
			return "", errEmpty
		}
		return w.vmProperty(req.Dest, req.Arg)
	case "admin.property.Get":
		if req.Dest != "dom0" || req.Arg == "" || len(req.Payload) != 0 {
			return "", errEmpty
		}
		switch req.Arg {
		case "default_qrexec_timeout":
			w.mu.Lock()
			defer w.mu.Unlock()
			return fmt.Sprintf("default=True type=int %d", w.DefaultQrexecTimeout), nil
		case "default_shutdown_timeout":
			return "default=True type=int 60", nil
		}
		return "", &exception{"QubesNoSuchPropertyError", fmt.Sprintf("Invalid property %s of dom0", quoteName(req.Arg))}
	case "admin.vm.device.block.Available":
		if len(req.Payload) != 0 {
			return "", errEmpty
		}
		return w.available(req.Dest, req.Arg), nil
	case "admin.vm.device.block.List":
		if w.dialect != R42 || len(req.Payload) != 0 {
			return "", errEmpty
		}
		return w.attached(req.Dest), nil
	case "admin.vm.device.block.Attached":
		if w.dialect != R43 || len(req.Payload) != 0 {
			return "", errEmpty
		}
		return w.attached(req.Dest), nil
	case "admin.vm.device.block.Attach":
		dev, ro, err := w.parseAttach(req)
		if err != nil {
			return "", err
		}
		return "", w.attach(req.Dest, dev, ro)
	case "admin.vm.device.block.Detach":
		if len(req.Payload) != 0 {
			return "", errEmpty
		}
		dev, err := parseDeviceArg(req.Arg)
		if err != nil {
			return "", errEmpty
		}
		return "", w.detach(req.Dest, dev)
	}
	return "", errEmpty // unknown method: ProtocolError
}

func (w *World) list(dest string) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var b strings.Builder
	for _, vm := range w.sortedVMs() {
		if dest != "dom0" && vm.Name != dest {
			continue
		}
		fmt.Fprintf(&b, "%s class=%s state=%s", vm.Name, vm.Class, vm.State)
		if w.dialect == R43 {
			fmt.Fprintf(&b, " uuid=%s", vm.UUID())
		}
		b.WriteByte('\n')
	}
	return b.String()
}

func (w *World) vmProperty(name, prop string) (string, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	vm := w.vms[name]
	switch prop {
	case "default_user":
		return "default=True type=str " + vm.DefaultUser, nil
	case "qrexec_timeout":
		return fmt.Sprintf("default=True type=int %d", vm.QrexecTimeout), nil
	case "klass":
		return "default=True type=str " + vm.Class, nil
	case "uuid":
		return "default=True type=str " + vm.UUID(), nil
	}
	return "", &exception{"QubesNoSuchPropertyError", fmt.Sprintf("Invalid property %s of %s", quoteName(prop), name)}
}
