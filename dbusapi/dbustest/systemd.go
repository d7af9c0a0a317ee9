package dbustest

import (
	"fmt"
	"os/exec"
	"sync"

	sdbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/godbus/dbus/v5"
)

// Systemd stands in for systemd's part in D-Bus activation on a private bus: both buses
// hand an activation to systemd (the service file's SystemdService=), dbus-daemon with
// an ActivationRequest signal, dbus-broker's launcher with LoadUnit and StartUnit calls.
// Units maps a unit name to the command that starts it; any
// other unit does not exist.
type Systemd struct {
	conn  *dbus.Conn
	units map[string]func() *exec.Cmd

	mu      sync.Mutex
	started []string
	jobs    uint32
	procs   []*exec.Cmd
}

const (
	systemdName = "org.freedesktop.systemd1"
	systemdPath = dbus.ObjectPath("/org/freedesktop/systemd1")
	managerIfc  = "org.freedesktop.systemd1.Manager"
)

// StartSystemd connects the stand-in to the bus at addr and owns systemd's name.
func StartSystemd(addr string, units map[string]func() *exec.Cmd) (*Systemd, error) {
	conn, err := dbus.Connect(addr)
	if err != nil {
		return nil, fmt.Errorf("cannot connect the systemd stand-in: %w", err)
	}
	s := &Systemd{conn: conn, units: units}
	if err := conn.Export(manager{s}, systemdPath, managerIfc); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("cannot export the systemd stand-in: %w", err)
	}
	// dbus-daemon --systemd-activation: a signal from the bus driver names the unit.
	if err := conn.AddMatchSignal(dbus.WithMatchInterface("org.freedesktop.systemd1.Activator"),
		dbus.WithMatchMember("ActivationRequest")); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("cannot subscribe to activation requests: %w", err)
	}
	signals := make(chan *dbus.Signal, 16)
	conn.Signal(signals)
	go func() {
		for sig := range signals {
			if unit, ok := activationRequest(sig); ok {
				_, _ = s.start(unit)
			}
		}
	}()
	reply, err := conn.RequestName(systemdName, dbus.NameFlagDoNotQueue)
	if err == nil && reply != dbus.RequestNameReplyPrimaryOwner {
		err = fmt.Errorf("the bus answered %d", reply)
	}
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("cannot own %s: %w", systemdName, err)
	}
	return s, nil
}

func activationRequest(sig *dbus.Signal) (string, bool) {
	if sig.Name != "org.freedesktop.systemd1.Activator.ActivationRequest" || sig.Sender != "org.freedesktop.DBus" || len(sig.Body) != 1 {
		return "", false
	}
	unit, ok := sig.Body[0].(string)
	return unit, ok
}

// Started lists the units started so far, in order.
func (s *Systemd) Started() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.started...)
}

// Stop disconnects the stand-in and kills what it started.
func (s *Systemd) Stop() {
	_ = s.conn.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.procs {
		_ = p.Process.Kill()
		_ = p.Wait()
	}
}

func (s *Systemd) start(unit string) (dbus.ObjectPath, *dbus.Error) {
	command, ok := s.units[unit]
	if !ok {
		return "", dbus.NewError("org.freedesktop.systemd1.NoSuchUnit", []any{"Unit " + unit + " not found."})
	}
	cmd := command()
	if err := cmd.Start(); err != nil {
		return "", dbus.MakeFailedError(err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.started = append(s.started, unit)
	s.procs = append(s.procs, cmd)
	s.jobs++
	return dbus.ObjectPath(fmt.Sprintf("%s/job/%d", systemdPath, s.jobs)), nil
}

// manager is the stand-in's org.freedesktop.systemd1.Manager: what dbus-broker's
// launcher calls.
type manager struct{ s *Systemd }

func (m manager) Subscribe() *dbus.Error { return nil }

func (m manager) LoadUnit(unit string) (dbus.ObjectPath, *dbus.Error) {
	if _, ok := m.s.units[unit]; !ok {
		return "", dbus.NewError("org.freedesktop.systemd1.NoSuchUnit", []any{"Unit " + unit + " not found."})
	}
	return unitPath(unit), nil
}

// StartUnit starts the unit. No JobRemoved follows: the launcher needs it only for a
// failed job (a success is the name taken, which the broker sees), and sent from here it
// would precede this reply.
func (m manager) StartUnit(unit, mode string) (dbus.ObjectPath, *dbus.Error) {
	return m.s.start(unit)
}

// unitPath is systemd's object path of a unit.
func unitPath(unit string) dbus.ObjectPath {
	return systemdPath + "/unit/" + dbus.ObjectPath(sdbus.PathBusEscape(unit))
}
