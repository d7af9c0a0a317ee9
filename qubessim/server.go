package qubessim

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/control"
	"github.com/qcrypt/qcrypt/qubessim/kernelcall"
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

// fired records that a fault fired, for WaitFault. w.mu not held.
func (w *World) fired(what string) {
	select {
	case w.firedCh <- what:
	default: // nobody is waiting for hundreds of them
	}
}

// WaitFault waits until a fault fires (or timeout) and says which.
func (w *World) WaitFault(timeout time.Duration) (string, error) {
	select {
	case what := <-w.firedCh:
		return what, nil
	case <-time.After(timeout):
		return "", fmt.Errorf("no fault fired within %v", timeout)
	}
}

// Release lets every held call go on.
func (w *World) Release() {
	w.mu.Lock()
	defer w.mu.Unlock()
	close(w.release)
	w.release = make(chan struct{})
}

// AddKernelFault installs a one-shot block operation fault.
func (w *World) AddKernelFault(f control.KernelFault) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.kfaults = append(w.kfaults, f)
}

// takeKernelFault removes and returns the fault for op in vm, if any. w.mu held.
func (w *World) takeKernelFault(vm string, op kernelcall.Op) (control.KernelFault, bool) {
	for i, f := range w.kfaults {
		if f.VM == vm && f.Op == op {
			w.kfaults = append(w.kfaults[:i], w.kfaults[i+1:]...)
			return f, true
		}
	}
	return control.KernelFault{}, false
}

// RestartQubesd is what the simulator's own qubesd does on a restart: every event
// stream and every call still held ends without an answer; new calls are served.
func (w *World) RestartQubesd() {
	w.mu.Lock()
	w.restarts++
	close(w.release)
	w.release = make(chan struct{})
	for s := range w.subs {
		w.dropSubscriber(s)
	}
	w.mu.Unlock()
}

// AddFault installs a call fault.
func (w *World) AddFault(f control.Fault) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.faults = append(w.faults, &f)
}

// SetLatency makes every later Admin API call (but the event stream) wait admin and
// every stand-in qrexec call wait qrexec before it is served: on this machine the
// simulator's calls cost CPU, on a real one they cost mostly latency (about 3 ms and
// 100 ms), which hides what an operation does in parallel. Zero ends it.
func (w *World) SetLatency(admin, qrexec time.Duration) {
	w.mu.Lock()
	w.adminLatency, w.qrexecLatency = admin, qrexec
	w.mu.Unlock()
}

// SetQrexecFault installs (or, with a zero value, removes) a qrexec fault for a qube.
func (w *World) SetQrexecFault(vm string, f control.QrexecFault) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if f == (control.QrexecFault{}) {
		delete(w.qrexec, vm)
	} else {
		w.qrexec[vm] = f
	}
}

// ClearFaults removes all call, qrexec and kernel faults, forgets the ones that fired,
// lets held calls go on and un-wedges qubesd.
func (w *World) ClearFaults() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.faults = nil
	w.qrexec = map[string]control.QrexecFault{}
	w.kfaults = nil
	w.wedged = false
	close(w.release)
	w.release = make(chan struct{})
	for len(w.firedCh) > 0 {
		<-w.firedCh // what fired before is forgotten with the faults
	}
}

// SetDescription makes a backend report desc for one of its devices (hostile qube).
func (w *World) SetDescription(dev qubes.DeviceRef, desc string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.descs[dev] = desc
}

func (w *World) takeFault(method, dest string) *control.Fault {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i, f := range w.faults {
		if f.Method != method || f.Dest != "" && f.Dest != dest {
			continue
		}
		if f.Count > 0 {
			f.Count--
			if f.Count == 0 {
				w.faults = append(w.faults[:i], w.faults[i+1:]...)
			}
		}
		c := *f
		return &c
	}
	return nil
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

// available renders the devices a running backend exposes.
func (w *World) available(backend, filter string) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	vm := w.vms[backend]
	if !vm.running() {
		return ""
	}
	var b strings.Builder
	var lines []string
	for _, d := range w.published(vm) {
		if filter != "" && d.name != filter {
			continue
		}
		ref := qubes.DeviceRef{Backend: backend, Port: d.name}
		desc := w.description(ref, d.desc)
		mode := "w"
		if d.ro {
			mode = "r"
		}
		if w.dialect == R42 {
			fmt.Fprintf(&b, "%s mode=%s size=%d device_node=/dev/%s description=%s\n", d.name, mode, d.size, d.name, sanitizeOld(desc))
			continue
		}
		desc = sanitizeNew(desc)
		model, label, _ := strings.Cut(desc, " ")
		props := map[string]string{
			"device_id": w.deviceID(backend, d.name), "port_id": d.name, "devclass": "block", "backend_domain": backend,
			"manufacturer": "hosted by " + backend, "interfaces": "b******",
			"serial": strings.TrimSpace(strings.ReplaceAll(model, "_", " ")),
		}
		if props["serial"] == "" {
			props["serial"] = "unknown"
		}
		if len(label) > 2 {
			props["name"] = strings.TrimSpace(strings.ReplaceAll(label, "_", " ")[1 : len(label)-1])
		}
		if d.parent != "" {
			props["manufacturer"] = "sub-device of " + backend + ":" + d.parent
			props["parent_devclass"], props["parent_port_id"] = "block", d.parent
		}
		if a := w.attachmentOf(ref); a != nil {
			props["attachment"] = a.Frontend
		}
		lines = append(lines, fmt.Sprintf("%s:%s %s\n", d.name, w.deviceID(backend, d.name), qubes.FormatProperties(props)))
	}
	// R4.3 sorts by the whole "port:device_id" (sda1::None:1 before sda::None).
	sort.Strings(lines)
	return b.String() + strings.Join(lines, "")
}

// attached renders a frontend's attachments (R4.2 List / R4.3 Attached). Stale ones are
// still listed: libvirt keeps the disk in the domain XML.
func (w *World) attached(frontend string) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var b strings.Builder
	for _, a := range w.attachmentsOf(frontend) {
		ro := "no"
		if a.ReadOnly {
			ro = "yes"
		}
		if w.dialect == R42 {
			fmt.Fprintf(&b, "%s+%s read-only=%s frontend-dev=%s persistent=no\n", a.Backend, a.Port, ro, a.FrontendDev)
			continue
		}
		props := map[string]string{
			"device_id": w.deviceID(a.Backend, a.Port), "port_id": a.Port, "devclass": "block", "backend_domain": a.Backend,
			"mode": "manual", "frontend_domain": frontend, "_read-only": ro, "_frontend-dev": a.FrontendDev,
		}
		fmt.Fprintf(&b, "%s+%s:%s %s\n", a.Backend, a.Port, w.deviceID(a.Backend, a.Port), qubes.FormatProperties(props))
	}
	return b.String()
}

func parseDeviceArg(arg string) (qubes.DeviceRef, error) {
	backend, rest, ok := strings.Cut(arg, "+")
	if !ok {
		return qubes.DeviceRef{}, errEmpty
	}
	port, _, _ := strings.Cut(rest, "+")
	ref := qubes.DeviceRef{Backend: backend, Port: port}
	if qubes.ValidateVMName(backend) != nil || qubes.ValidatePort(port) != nil {
		return ref, errEmpty
	}
	return ref, nil
}

// parseAttach validates an Attach request like the block extension: options
// read-only, frontend-dev, devtype; anything else is refused.
func (w *World) parseAttach(req qubes.Request) (qubes.DeviceRef, *bool, error) {
	dev, err := parseDeviceArg(req.Arg)
	if err != nil {
		return dev, nil, err
	}
	opts := map[string]string{}
	if w.dialect == R42 {
		for _, f := range strings.Fields(string(req.Payload)) {
			k, v, ok := strings.Cut(f, "=")
			if !ok || !optToken(k, "") || !optToken(v, ",+:") {
				return dev, nil, errEmpty
			}
			if k == "persistent" {
				if parseBool(v) == nil {
					return dev, nil, errEmpty
				}
				if *parseBool(v) {
					return dev, nil, &exception{"QubesException", "not supported by the simulator: persistent attachments"}
				}
				continue
			}
			opts[k] = v
		}
	} else {
		props, err := qubes.ParseProperties(string(req.Payload))
		if err != nil {
			return dev, nil, errEmpty
		}
		for k, v := range props {
			if opt, ok := strings.CutPrefix(k, "_"); ok {
				opts[opt] = v
				continue
			}
			switch k {
			case "backend_domain":
				if v != dev.Backend {
					return dev, nil, errEmpty
				}
			case "port_id":
				if v != dev.Port {
					return dev, nil, errEmpty
				}
			case "devclass":
				if v != "block" {
					return dev, nil, errEmpty
				}
			}
		}
	}
	var ro *bool
	for k, v := range opts {
		switch k {
		case "read-only":
			if ro = parseBool(v); ro == nil {
				return dev, nil, &exception{"QubesValueError", "read-only option can only have 'yes' or 'no' value"}
			}
		case "frontend-dev":
			return dev, nil, &exception{"QubesException", "not supported by the simulator: frontend-dev option"}
		case "devtype":
			if v != "disk" {
				return dev, nil, &exception{"QubesException", "not supported by the simulator: devtype " + v}
			}
		default:
			return dev, nil, &exception{"QubesValueError", "Unsupported option " + k}
		}
	}
	return dev, ro, nil
}

func optToken(s, extra string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("_.-"+extra, c) >= 0) {
			return false
		}
	}
	return true
}

func parseBool(v string) *bool {
	t, f := true, false
	switch strings.ToLower(v) {
	case "1", "yes", "true", "on":
		return &t
	case "0", "no", "false", "off":
		return &f
	}
	return nil
}
