package qubes

import (
	"bytes"
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Power states as qubesd reports them (qubes/vm/qubesvm.py get_power_state).
const (
	StateHalted    = "Halted"
	StateTransient = "Transient"
	StateRunning   = "Running"
	StatePaused    = "Paused"
	StateSuspended = "Suspended"
	StateHalting   = "Halting"
	StateDying     = "Dying"
	StateCrashed   = "Crashed"
	StateNA        = "NA"
)

var powerStates = map[string]bool{
	StateHalted: true, StateTransient: true, StateRunning: true, StatePaused: true,
	StateSuspended: true, StateHalting: true, StateDying: true, StateCrashed: true, StateNA: true,
}

// IsRunning follows qubesadmin: anything but Halted and NA has a domain.
func IsRunning(state string) bool { return state != StateHalted && state != StateNA && state != "" }

// VM is one line of admin.vm.List.
type VM struct {
	Name  string
	Class string
	State string
	UUID  string // R4.3+ only
}

var (
	classRE = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9]{0,40}$`)
	uuidRE  = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
	userRE  = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)
)

// ListVMs returns every qube (dest dom0).
func (c *Client) ListVMs(ctx context.Context) ([]VM, error) {
	body, err := c.read(ctx, Request{Method: "admin.vm.List", Dest: "dom0"})
	if err != nil {
		return nil, err
	}
	return ParseVMList(body)
}

// ParseVMList parses "<name> class=<C> state=<S>[ uuid=<U>]\n" lines, ignoring unknown
// keys. A malformed line fails the whole answer: a partial list would make qcryptd
// believe qubes are gone.
func ParseVMList(body []byte) ([]VM, error) {
	var vms []VM
	for _, line := range splitLines(body) {
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		vm := VM{Name: fields[0]}
		if err := ValidateVMName(vm.Name); err != nil {
			return nil, fmt.Errorf("%w: admin.vm.List: %w", ErrProtocol, err)
		}
		for _, f := range fields[1:] {
			k, v, ok := strings.Cut(f, "=")
			if !ok {
				continue
			}
			switch k {
			case "class":
				if !classRE.MatchString(v) {
					return nil, fmt.Errorf("%w: admin.vm.List: bad class for %s", ErrProtocol, vm.Name)
				}
				vm.Class = v
			case "state":
				if !powerStates[v] {
					return nil, fmt.Errorf("%w: admin.vm.List: bad state for %s", ErrProtocol, vm.Name)
				}
				vm.State = v
			case "uuid":
				if !uuidRE.MatchString(v) {
					return nil, fmt.Errorf("%w: admin.vm.List: bad uuid for %s", ErrProtocol, vm.Name)
				}
				vm.UUID = v
			}
		}
		if vm.State == "" {
			return nil, fmt.Errorf("%w: admin.vm.List: no state for %s", ErrProtocol, vm.Name)
		}
		vms = append(vms, vm)
	}
	return vms, nil
}

// CurrentState returns the power state of one qube.
func (c *Client) CurrentState(ctx context.Context, vm string) (string, error) {
	body, err := c.Call(ctx, Request{Method: "admin.vm.CurrentState", Dest: vm})
	if err != nil {
		return "", err
	}
	for _, f := range strings.Fields(string(body)) {
		if k, v, _ := strings.Cut(f, "="); k == "power_state" {
			if !powerStates[v] {
				return "", fmt.Errorf("%w: admin.vm.CurrentState: unknown power state", ErrProtocol)
			}
			return v, nil
		}
	}
	return "", fmt.Errorf("%w: admin.vm.CurrentState: no power_state", ErrProtocol)
}

// Start starts a halted qube and waits until its qrexec agent is up. On a qube that is
// not halted it is a successful no-op (qubesd semantics).
func (c *Client) Start(ctx context.Context, vm string) error {
	return c.empty(ctx, Request{Method: "admin.vm.Start", Dest: vm})
}

// Shutdown asks a qube to shut down; force lets a netvm go down with clients, wait
// blocks until it is halted (up to its shutdown_timeout).
func (c *Client) Shutdown(ctx context.Context, vm string, force, wait bool) error {
	var args []string
	if force {
		args = append(args, "force")
	}
	if wait {
		args = append(args, "wait")
	}
	return c.empty(ctx, Request{Method: "admin.vm.Shutdown", Arg: strings.Join(args, "+"), Dest: vm})
}

// Kill destroys a running or paused qube at once.
func (c *Client) Kill(ctx context.Context, vm string) error {
	return c.empty(ctx, Request{Method: "admin.vm.Kill", Dest: vm})
}

// Pause pauses a running qube.
func (c *Client) Pause(ctx context.Context, vm string) error {
	return c.empty(ctx, Request{Method: "admin.vm.Pause", Dest: vm})
}

// Unpause resumes a paused qube.
func (c *Client) Unpause(ctx context.Context, vm string) error {
	return c.empty(ctx, Request{Method: "admin.vm.Unpause", Dest: vm})
}

func (c *Client) empty(ctx context.Context, req Request) error {
	body, err := c.Call(ctx, req)
	if err != nil {
		return err
	}
	if len(body) != 0 {
		return fmt.Errorf("%w: %s: unexpected body", ErrProtocol, req.Method)
	}
	return nil
}

// Property is the answer of admin.vm.property.Get / admin.property.Get.
type Property struct {
	Default bool
	Type    string // str, int, bool, vm, label
	Value   string // empty for None
}

// VMProperty reads a property of a qube.
func (c *Client) VMProperty(ctx context.Context, vm, name string) (Property, error) {
	body, err := c.Call(ctx, Request{Method: "admin.vm.property.Get", Arg: name, Dest: vm})
	if err != nil {
		return Property{}, err
	}
	return ParseProperty(body)
}

// GlobalProperty reads a property of the Qubes system (dest dom0).
func (c *Client) GlobalProperty(ctx context.Context, name string) (Property, error) {
	body, err := c.Call(ctx, Request{Method: "admin.property.Get", Arg: name, Dest: "dom0"})
	if err != nil {
		return Property{}, err
	}
	return ParseProperty(body)
}

// ParseProperty parses "default=<True|False> type=<t> <value>".
func ParseProperty(body []byte) (Property, error) {
	parts := bytes.SplitN(body, []byte{' '}, 3)
	if len(parts) != 3 {
		return Property{}, fmt.Errorf("%w: property answer needs 3 fields", ErrProtocol)
	}
	var p Property
	switch string(parts[0]) {
	case "default=True":
		p.Default = true
	case "default=False":
	default:
		return Property{}, fmt.Errorf("%w: bad property default field", ErrProtocol)
	}
	t, ok := strings.CutPrefix(string(parts[1]), "type=")
	if !ok || !classRE.MatchString(t) {
		return Property{}, fmt.Errorf("%w: bad property type field", ErrProtocol)
	}
	p.Type = t
	p.Value = string(parts[2])
	return p, nil
}

// DefaultUser returns a qube's default_user, validated as a plain user name because it
// becomes part of paths (home of the key directory).
func (c *Client) DefaultUser(ctx context.Context, vm string) (string, error) {
	p, err := c.VMProperty(ctx, vm, "default_user")
	if err != nil {
		return "", err
	}
	if !userRE.MatchString(p.Value) {
		return "", fmt.Errorf("%w: default_user of %s is not a plain user name", ErrProtocol, vm)
	}
	return p.Value, nil
}

// QrexecTimeout returns a qube's qrexec_timeout in seconds.
func (c *Client) QrexecTimeout(ctx context.Context, vm string) (int, error) {
	p, err := c.VMProperty(ctx, vm, "qrexec_timeout")
	if err != nil {
		return 0, err
	}
	return parseSeconds(p)
}

// DefaultQrexecTimeout returns the global default_qrexec_timeout in seconds.
func (c *Client) DefaultQrexecTimeout(ctx context.Context) (int, error) {
	p, err := c.GlobalProperty(ctx, "default_qrexec_timeout")
	if err != nil {
		return 0, err
	}
	return parseSeconds(p)
}

func parseSeconds(p Property) (int, error) {
	n, err := strconv.Atoi(p.Value)
	if err != nil || n < 0 || n > 86400 {
		return 0, fmt.Errorf("%w: timeout property %q is not a number of seconds", ErrProtocol, Printable(p.Value, 20))
	}
	return n, nil
}

// splitLines splits a body on '\n' without the empty tail.
func splitLines(body []byte) []string {
	s := strings.TrimSuffix(string(body), "\n")
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}
