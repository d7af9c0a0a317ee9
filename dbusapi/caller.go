package dbusapi

import (
	"fmt"
	"os/user"
	"strconv"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/prop"
)

// Caller is who sent a method call, as the bus reports it (GetConnectionCredentials):
// the same facts the bus policy decides on, so qcryptd and the policy agree both ways.
type Caller struct {
	UID  uint32
	GIDs []uint32 // primary and supplementary groups; nil when the bus cannot tell
}

// InGroup reports whether the caller is in group gid.
func (c Caller) InGroup(gid uint32) bool {
	for _, g := range c.GIDs {
		if g == gid {
			return true
		}
	}
	return false
}

// AdminGroup is the group whose members may use qcryptd besides root (dom0's group of
// the desktop user, as for qubesd.sock).
const AdminGroup = "qubes"

// RootOrQubes allows root and members of group qubes. The group is looked up by name
// on every call, as the bus policy is when it is loaded; without it only root may act.
func RootOrQubes(c Caller) bool {
	if c.UID == 0 {
		return true
	}
	g, err := user.LookupGroup(AdminGroup)
	if err != nil {
		return false
	}
	gid, err := strconv.ParseUint(g.Gid, 10, 32)
	return err == nil && c.InGroup(uint32(gid))
}

// credentials asks the bus who owns a unique name.
func credentials(conn *dbus.Conn, sender dbus.Sender) (Caller, error) {
	var creds map[string]dbus.Variant
	if err := conn.BusObject().Call("org.freedesktop.DBus.GetConnectionCredentials", 0, string(sender)).Store(&creds); err != nil {
		return Caller{}, fmt.Errorf("cannot identify the caller: %w", err)
	}
	var c Caller
	uid, ok := creds["UnixUserID"]
	if !ok || uid.Store(&c.UID) != nil {
		return Caller{}, fmt.Errorf("cannot identify the caller: the bus gave no user id")
	}
	if gids, ok := creds["UnixGroupIDs"]; ok {
		if err := gids.Store(&c.GIDs); err != nil {
			return Caller{}, fmt.Errorf("cannot identify the caller's groups: %w", err)
		}
	}
	return c, nil
}

// guardedProps is org.freedesktop.DBus.Properties with the caller check in front of
// godbus' implementation: chain and job state is for root and group qubes only.
type guardedProps struct {
	s     *Server
	props *prop.Properties
}

func (g guardedProps) Get(sender dbus.Sender, iface, name string) (dbus.Variant, *dbus.Error) {
	if _, err := g.s.caller(sender); err != nil {
		return dbus.Variant{}, err
	}
	return g.props.Get(iface, name)
}

func (g guardedProps) GetAll(sender dbus.Sender, iface string) (map[string]dbus.Variant, *dbus.Error) {
	if _, err := g.s.caller(sender); err != nil {
		return nil, err
	}
	return g.props.GetAll(iface)
}

func (g guardedProps) Set(sender dbus.Sender, iface, name string, v dbus.Variant) *dbus.Error {
	if _, err := g.s.caller(sender); err != nil {
		return err
	}
	return g.props.Set(iface, name, v)
}

// exportProps exports properties at path behind the caller check.
func (s *Server) exportProps(path dbus.ObjectPath, m prop.Map) (*prop.Properties, error) {
	props, err := prop.Export(s.conn, path, m)
	if err != nil {
		return nil, err
	}
	if err := s.conn.Export(guardedProps{s, props}, path, propertiesInterface); err != nil {
		return nil, err
	}
	return props, nil
}
