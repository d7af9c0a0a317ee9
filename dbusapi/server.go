package dbusapi

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/prop"
	"github.com/sirupsen/logrus"
)

// Server exports qcryptd on a bus connection. Its handlers (methods.go) only check the
// caller, decode arguments and call the Backend; it implements the daemon's Publisher
// (publish.go), which reflects state changes as properties and signals.
type Server struct {
	conn    *dbus.Conn
	backend Backend
	// Authorize decides whether a caller may call methods and read state (default: root
	// or group qubes); introspection and Peer stay open to everyone.
	Authorize func(Caller) bool
	// CallTimeout bounds Status and Discover, which run scripts in qubes.
	CallTimeout time.Duration
	// Log receives what could not be published.
	Log *logrus.Entry

	mu           sync.Mutex
	manager      *prop.Properties
	chains       map[string]*exported
	jobs         map[uint64]*exported
	introspected string // children in the manager's exported introspection
	exportedOnce bool
}

type exported struct {
	path  dbus.ObjectPath
	props *prop.Properties
	iface string
}

// NewServer prepares a server; Export makes it visible.
func NewServer(conn *dbus.Conn, b Backend, log *logrus.Entry) *Server {
	return &Server{conn: conn, backend: b, Authorize: RootOrQubes, CallTimeout: 5 * time.Minute, Log: log,
		chains: map[string]*exported{}, jobs: map[uint64]*exported{}}
}

// Export exports the manager, its properties, the ObjectManager and introspection. The
// caller then requests the bus name (the name is the readiness signal).
func (s *Server) Export() error {
	version, target, summary := s.backend.Info()
	props, err := s.exportProps(ManagerPath, prop.Map{ManagerInterface: {
		"Version": {Value: version, Emit: prop.EmitConst},
		"Target":  {Value: target, Emit: prop.EmitConst},
		"Summary": {Value: summary, Emit: prop.EmitTrue},
	}})
	if err != nil {
		return fmt.Errorf("cannot export the manager: %w", err)
	}
	s.manager = props
	if err := s.conn.Export(&manager{s}, ManagerPath, ManagerInterface); err != nil {
		return fmt.Errorf("cannot export the manager: %w", err)
	}
	if err := s.conn.Export(&objectManager{s}, ManagerPath, objectManagerInterface); err != nil {
		return fmt.Errorf("cannot export the object manager: %w", err)
	}
	for _, d := range []directory{{s, chainPathPrefix}, {s, jobPathPrefix}} {
		if err := s.conn.Export(d, dbus.ObjectPath(strings.TrimSuffix(d.prefix, "/")), introspectableInterface); err != nil {
			return fmt.Errorf("cannot export %s: %w", d.prefix, err)
		}
	}
	return s.refreshManagerIntrospection()
}

// RequestName takes the well-known name; anything but primary ownership is an error.
func (s *Server) RequestName() error {
	reply, err := s.conn.RequestName(BusName, dbus.NameFlagDoNotQueue)
	if err != nil {
		return fmt.Errorf("cannot own %s: %w", BusName, err)
	}
	if reply != dbus.RequestNameReplyPrimaryOwner {
		return fmt.Errorf("cannot own %s: it is taken (another qcryptd running?)", BusName)
	}
	return nil
}

// directory answers the introspection of the chain or job directory. Its children name
// chains (an ad-hoc one is KEY@TARGET) and jobs: they are for root and group qubes,
// like ListChains; anyone else sees an empty directory.
type directory struct {
	s      *Server
	prefix string
}

func (d directory) Introspect(sender dbus.Sender) (string, *dbus.Error) {
	var children []string
	if _, err := d.s.caller(sender); err == nil {
		children = d.s.children(d.prefix)
	}
	return directoryXML(children), nil
}

// children names the objects in a directory.
func (s *Server) children(prefix string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	add := func(e *exported) { out = append(out, strings.TrimPrefix(string(e.path), prefix)) }
	if prefix == chainPathPrefix {
		for _, e := range s.chains {
			add(e)
		}
	} else {
		for _, e := range s.jobs {
			add(e)
		}
	}
	return out
}

// caller checks that the sender may act or read, and returns its uid.
func (s *Server) caller(sender dbus.Sender) (uint32, *dbus.Error) {
	c, err := credentials(s.conn, sender)
	if err != nil {
		return 0, toDBus(err)
	}
	if !s.Authorize(c) {
		return c.UID, toDBus(ErrAccessDenied)
	}
	return c.UID, nil
}

func (s *Server) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), s.CallTimeout)
}
