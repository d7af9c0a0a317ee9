package qubes

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// DeviceAPI is the block-device dialect of a qubesd: R4.1 and R4.2 share the old one
// (Available/List, "k=v description=..." lines); R4.3 introduced the new devices API
// (Available/Attached/Assigned with key='value' serialisation).
type DeviceAPI int

// The device API generations.
const (
	DeviceAPIUnknown DeviceAPI = iota
	DeviceAPIOld               // R4.1, R4.2
	DeviceAPINew               // R4.3 and later
)

func (a DeviceAPI) String() string {
	switch a {
	case DeviceAPIOld:
		return "R4.1/R4.2"
	case DeviceAPINew:
		return "R4.3+"
	}
	return "unknown"
}

// DeviceRef names a block device the same way on every dialect.
type DeviceRef struct {
	Backend string
	Port    string
}

func (d DeviceRef) String() string { return d.Backend + ":" + d.Port }

// BlockDevice is a device a backend qube exposes. Everything but Backend comes from the
// backend's QubesDB and is under that qube's control: use it to find candidates, never
// to decide what a device is.
type BlockDevice struct {
	DeviceRef
	Description string // printable; R4.2 description, R4.3 "serial (name)"
	Mode        string // "r" or "w"; empty on R4.3, which no longer reports it
	Size        int64  // bytes; -1 when unknown (R4.3)
	Frontend    string // qube it is attached to, R4.3 only (R4.2: use Attached)
}

// Attachment is a block device attached to a frontend qube.
type Attachment struct {
	DeviceRef
	Frontend    string
	ReadOnly    bool
	FrontendDev string // e.g. "xvdi"; empty if qubesd did not say
}

// DeviceAPI returns the dialect, probing once: admin.vm.device.block.Attached exists only
// in R4.3+; on R4.1/R4.2 it is an unknown method, which those releases answer with an
// empty response. dom0 is always running, so it is a safe destination for the probe.
func (c *Client) DeviceAPI(ctx context.Context) (DeviceAPI, error) {
	c.apiMu.Lock()
	defer c.apiMu.Unlock()
	if c.api != DeviceAPIUnknown {
		return c.api, nil
	}
	_, err := c.Call(ctx, Request{Method: "admin.vm.device.block.Attached", Dest: "dom0"})
	switch {
	case err == nil:
		c.api = DeviceAPINew
	case errors.Is(err, ErrEmptyResponse), errors.Is(err, ErrRefused):
		c.api = DeviceAPIOld
	default:
		return DeviceAPIUnknown, fmt.Errorf("cannot detect the device API: %w", err)
	}
	return c.api, nil
}

// SetDeviceAPI skips detection (tests, or a user who knows the release).
func (c *Client) SetDeviceAPI(api DeviceAPI) {
	c.apiMu.Lock()
	c.api = api
	c.apiMu.Unlock()
}

// Available lists the block devices a backend exposes, sorted by port.
func (c *Client) Available(ctx context.Context, backend string) ([]BlockDevice, error) {
	api, err := c.DeviceAPI(ctx)
	if err != nil {
		return nil, err
	}
	body, err := c.read(ctx, Request{Method: "admin.vm.device.block.Available", Dest: backend})
	if err != nil {
		return nil, err
	}
	if api == DeviceAPINew {
		return ParseAvailableNew(backend, body)
	}
	return ParseAvailableOld(backend, body)
}

// Attached lists the block devices attached to a frontend.
func (c *Client) Attached(ctx context.Context, frontend string) ([]Attachment, error) {
	api, err := c.DeviceAPI(ctx)
	if err != nil {
		return nil, err
	}
	method := "admin.vm.device.block.List"
	if api == DeviceAPINew {
		method = "admin.vm.device.block.Attached"
	}
	body, err := c.read(ctx, Request{Method: method, Dest: frontend})
	if err != nil {
		return nil, err
	}
	if api == DeviceAPINew {
		return ParseAttachedNew(frontend, body)
	}
	return ParseAttachedOld(frontend, body)
}

// Attach attaches backend:port to frontend for this session only (never persistent).
func (c *Client) Attach(ctx context.Context, frontend string, dev DeviceRef, readOnly bool) error {
	if err := checkRef(dev); err != nil {
		return err
	}
	api, err := c.DeviceAPI(ctx)
	if err != nil {
		return err
	}
	ro := "no"
	if readOnly {
		ro = "yes"
	}
	var payload string
	if api == DeviceAPINew {
		payload = fmt.Sprintf("device_id='*' port_id='%s' devclass='block' backend_domain='%s' mode='manual' frontend_domain='%s' _read-only='%s'",
			dev.Port, dev.Backend, frontend, ro)
	} else {
		payload = "read-only=" + ro
	}
	return c.empty(ctx, Request{Method: "admin.vm.device.block.Attach", Arg: dev.Backend + "+" + dev.Port, Dest: frontend, Payload: []byte(payload)})
}

// Detach detaches backend:port from frontend.
func (c *Client) Detach(ctx context.Context, frontend string, dev DeviceRef) error {
	if err := checkRef(dev); err != nil {
		return err
	}
	return c.empty(ctx, Request{Method: "admin.vm.device.block.Detach", Arg: dev.Backend + "+" + dev.Port, Dest: frontend})
}

func checkRef(dev DeviceRef) error {
	if err := ValidateVMName(dev.Backend); err != nil {
		return err
	}
	return ValidatePort(dev.Port)
}

// ParseAvailableOld parses R4.1/R4.2 lines "<ident> k=v ... description=<desc>"; the
// middle keys come in any order and description, always last, may contain spaces.
func ParseAvailableOld(backend string, body []byte) ([]BlockDevice, error) {
	var out []BlockDevice
	for _, line := range splitLines(body) {
		ident, info, _ := strings.Cut(line, " ")
		if err := ValidatePort(ident); err != nil {
			return nil, fmt.Errorf("%w: Available on %s: %w", ErrProtocol, backend, err)
		}
		d := BlockDevice{DeviceRef: DeviceRef{backend, ident}, Size: -1}
		info, desc, hasDesc := strings.Cut(info, "description=")
		if hasDesc {
			d.Description = Printable(desc, 256)
		}
		for _, f := range strings.Fields(info) {
			k, v, _ := strings.Cut(f, "=")
			switch k {
			case "mode":
				if v != "r" && v != "w" {
					return nil, fmt.Errorf("%w: Available on %s: bad mode", ErrProtocol, backend)
				}
				d.Mode = v
			case "size":
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil || n < 0 {
					return nil, fmt.Errorf("%w: Available on %s: bad size", ErrProtocol, backend)
				}
				d.Size = n
			}
		}
		out = append(out, d)
	}
	sortDevices(out)
	return out, nil
}

// ParseAvailableNew parses R4.3+ lines "<port>:<device_id> key='value' ...".
func ParseAvailableNew(backend string, body []byte) ([]BlockDevice, error) {
	var out []BlockDevice
	for _, line := range splitLines(body) {
		head, rest, _ := strings.Cut(line, " ")
		port, _, _ := strings.Cut(head, ":")
		if err := ValidatePort(port); err != nil {
			return nil, fmt.Errorf("%w: Available on %s: %w", ErrProtocol, backend, err)
		}
		props, err := ParseProperties(rest)
		if err != nil {
			return nil, fmt.Errorf("%w: Available on %s: %w", ErrProtocol, backend, err)
		}
		if p, ok := props["port_id"]; ok && p != port {
			return nil, fmt.Errorf("%w: Available on %s: port_id does not match", ErrProtocol, backend)
		}
		if b, ok := props["backend_domain"]; ok && b != backend {
			return nil, fmt.Errorf("%w: Available on %s: backend_domain does not match", ErrProtocol, backend)
		}
		d := BlockDevice{DeviceRef: DeviceRef{backend, port}, Size: -1}
		desc := props["serial"]
		if name := props["name"]; name != "" && name != "unknown" {
			desc += " (" + name + ")"
		}
		d.Description = Printable(desc, 256)
		if fe := props["attachment"]; fe != "" {
			if err := ValidateVMName(fe); err != nil {
				return nil, fmt.Errorf("%w: Available on %s: %w", ErrProtocol, backend, err)
			}
			d.Frontend = fe
		}
		out = append(out, d)
	}
	sortDevices(out)
	return out, nil
}

// ParseAttachedOld parses R4.1/R4.2 admin.vm.device.block.List lines
// "<backend>+<ident> read-only=no frontend-dev=xvdi persistent=no".
func ParseAttachedOld(frontend string, body []byte) ([]Attachment, error) {
	var out []Attachment
	for _, line := range splitLines(body) {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		ref, err := parseQArg(fields[0])
		if err != nil {
			return nil, fmt.Errorf("%w: List on %s: %w", ErrProtocol, frontend, err)
		}
		a := Attachment{DeviceRef: ref, Frontend: frontend}
		for _, f := range fields[1:] {
			k, v, _ := strings.Cut(f, "=")
			if err := a.setOption(k, v); err != nil {
				return nil, fmt.Errorf("%w: List on %s: %w", ErrProtocol, frontend, err)
			}
		}
		out = append(out, a)
	}
	sortAttachments(out)
	return out, nil
}

// ParseAttachedNew parses R4.3+ lines "<backend>+<port>:<device_id> key='value' ...".
func ParseAttachedNew(frontend string, body []byte) ([]Attachment, error) {
	var out []Attachment
	for _, line := range splitLines(body) {
		head, rest, _ := strings.Cut(line, " ")
		head, _, _ = strings.Cut(head, ":")
		ref, err := parseQArg(head)
		if err != nil {
			return nil, fmt.Errorf("%w: Attached on %s: %w", ErrProtocol, frontend, err)
		}
		props, err := ParseProperties(rest)
		if err != nil {
			return nil, fmt.Errorf("%w: Attached on %s: %w", ErrProtocol, frontend, err)
		}
		if fe, ok := props["frontend_domain"]; ok && fe != frontend {
			return nil, fmt.Errorf("%w: Attached on %s: frontend_domain does not match", ErrProtocol, frontend)
		}
		a := Attachment{DeviceRef: ref, Frontend: frontend}
		for k, v := range props {
			if opt, ok := strings.CutPrefix(k, "_"); ok {
				if err := a.setOption(opt, v); err != nil {
					return nil, fmt.Errorf("%w: Attached on %s: %w", ErrProtocol, frontend, err)
				}
			}
		}
		out = append(out, a)
	}
	sortAttachments(out)
	return out, nil
}

func (a *Attachment) setOption(k, v string) error {
	switch k {
	case "read-only":
		switch strings.ToLower(v) {
		case "yes", "true", "1", "on":
			a.ReadOnly = true
		case "no", "false", "0", "off":
			a.ReadOnly = false
		default:
			return fmt.Errorf("bad read-only value")
		}
	case "frontend-dev":
		if !portRE.MatchString(v) {
			return fmt.Errorf("bad frontend-dev value")
		}
		a.FrontendDev = v
	}
	return nil
}

// parseQArg parses "<backend>+<port>[+<device id parts>]".
func parseQArg(s string) (DeviceRef, error) {
	backend, rest, ok := strings.Cut(s, "+")
	if !ok {
		return DeviceRef{}, fmt.Errorf("device %q has no backend", Printable(s, 40))
	}
	port, _, _ := strings.Cut(rest, "+")
	ref := DeviceRef{backend, port}
	if err := checkRef(ref); err != nil {
		return DeviceRef{}, err
	}
	return ref, nil
}

// ParseProperties implements qubesd's unpack_properties for "key='value' key2='v\'2'".
func ParseProperties(s string) (map[string]string, error) {
	s = strings.TrimSpace(s)
	props := map[string]string{}
	if s == "" {
		return props, nil
	}
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 || s[i] < 0x20 {
			return nil, errors.New("non-ASCII or control byte in properties")
		}
	}
	key, rest, ok := strings.Cut(s, "='")
	if !ok {
		return nil, errors.New("properties do not start with key='")
	}
	for {
		if !validPropKey(key) {
			return nil, fmt.Errorf("bad property key %q", Printable(key, 40))
		}
		if _, dup := props[key]; dup {
			return nil, fmt.Errorf("duplicate property %q", key)
		}
		valueKey, after, more := strings.Cut(rest, "='")
		if !more {
			if !strings.HasSuffix(rest, "'") {
				return nil, errors.New("unterminated property value")
			}
			props[key] = strings.ReplaceAll(rest[:len(rest)-1], `\'`, `'`)
			return props, nil
		}
		i := strings.LastIndex(valueKey, "' ")
		if i < 0 {
			return nil, errors.New("property value not followed by a key")
		}
		props[key] = strings.ReplaceAll(valueKey[:i], `\'`, `'`)
		key, rest = valueKey[i+2:], after
	}
}

func validPropKey(k string) bool {
	if k == "" || len(k) > 64 {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if !isAlnum(c) && !strings.ContainsRune("!#$%&()*+,-./:;<>?@[\\]^_{|}~", rune(c)) {
			return false
		}
	}
	return true
}

// FormatProperties renders props the way qubesd serialises them (sorted keys, for
// deterministic output; qubesd's order is not significant).
func FormatProperties(props map[string]string) string {
	keys := make([]string, 0, len(props))
	for k := range props {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(' ')
		}
		fmt.Fprintf(&b, "%s='%s'", k, strings.ReplaceAll(props[k], "'", `\'`))
	}
	return b.String()
}

func sortDevices(d []BlockDevice) {
	sort.Slice(d, func(i, j int) bool { return d[i].Port < d[j].Port })
}

func sortAttachments(a []Attachment) {
	sort.Slice(a, func(i, j int) bool {
		if a[i].Backend != a[j].Backend {
			return a[i].Backend < a[j].Backend
		}
		return a[i].Port < a[j].Port
	})
}

// FrontendSlots lists the xvdX names qubesd gives attached block devices in a qube, in
// its order of choice (qubes/ext/block.py find_unused_frontend): R4.1/R4.2 xvdi-xvdz,
// then xvde-xvdh (xvda-xvdd are the system volumes); R4.3 xvdi-xvdz, then xvdaa-xvdzz.
// With none free, qubesd fails the attach without saying why.
func FrontendSlots(api DeviceAPI) []string {
	var slots []string
	for c := 'i'; c <= 'z'; c++ {
		slots = append(slots, "xvd"+string(c))
	}
	if api == DeviceAPIOld {
		for c := 'e'; c <= 'h'; c++ {
			slots = append(slots, "xvd"+string(c))
		}
		return slots
	}
	for c := 'a'; c <= 'z'; c++ {
		for d := 'a'; d <= 'z'; d++ {
			slots = append(slots, "xvd"+string(c)+string(d))
		}
	}
	return slots
}

// FreeFrontend reports whether a qube with these attachments has a slot left.
func FreeFrontend(api DeviceAPI, atts []Attachment) bool {
	used := map[string]bool{}
	for _, a := range atts {
		used[a.FrontendDev] = true
	}
	for _, s := range FrontendSlots(api) {
		if !used[s] {
			return true
		}
	}
	return false
}
