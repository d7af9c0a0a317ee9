// The device API: what qubesd answers about block devices and how it reads an attach.

package qubessim

import (
	"fmt"
	"sort"
	"strings"

	"github.com/qcrypt/qcrypt/qubes"
)

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
