package dbusapi

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"
	"github.com/godbus/dbus/v5/prop"

	"github.com/qcrypt/qcrypt/chains"
)

// Server exports qcryptd on a bus connection. Its handlers only check the caller,
// decode arguments and call the Backend; it implements the daemon's Publisher, which
// reflects state changes as properties and signals.
type Server struct {
	conn    *dbus.Conn
	backend Backend
	// Authorize decides whether a caller may call methods and read state (default: root
	// or group qubes); introspection and Peer stay open to everyone.
	Authorize func(Caller) bool
	// CallTimeout bounds Status and Discover, which run scripts in qubes.
	CallTimeout time.Duration

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
func NewServer(conn *dbus.Conn, b Backend) *Server {
	return &Server{conn: conn, backend: b, Authorize: RootOrQubes, CallTimeout: 5 * time.Minute,
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
	s.refreshManagerIntrospection()
	return nil
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

// refreshManagerIntrospection lists the manager's children (chain, job) when that set
// changes: only when the first object of a kind appears or the last goes.
func (s *Server) refreshManagerIntrospection() {
	s.mu.Lock()
	var children []string
	if len(s.chains) > 0 {
		children = append(children, "chain")
	}
	if len(s.jobs) > 0 {
		children = append(children, "job")
	}
	key := strings.Join(children, ",")
	if s.introspected == key && s.exportedOnce {
		s.mu.Unlock()
		return
	}
	s.introspected, s.exportedOnce = key, true
	s.mu.Unlock()
	s.conn.Export(introspect.Introspectable(nodeXML([]string{ManagerXML, objectManagerXML}, children)), ManagerPath, "org.freedesktop.DBus.Introspectable")
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

// chainProps is the property map of a chain object.
func chainProps(c ChainInfo) map[string]any {
	usec := func(t time.Time) uint64 {
		if t.IsZero() {
			return 0
		}
		return uint64(t.UnixMicro())
	}
	layers := c.Layers
	if layers == nil {
		layers = []string{}
	}
	return map[string]any{
		"Name": c.Name, "State": c.State, "Waiting": c.Waiting, "Step": c.Step, "Steps": c.Steps,
		"LastError": c.LastError, "LastChange": usec(c.LastChange), "RetryAt": usec(c.RetryAt),
		"Managed": c.Managed, "Autostart": c.Autostart, "ReadOnly": c.ReadOnly, "Layers": layers,
		"Target": c.Target, "MountPoint": c.MountPoint,
	}
}

func jobProps(j JobInfo) map[string]any {
	return map[string]any{
		"Operation": j.Operation, "Chain": j.Chain, "State": j.State, "Step": j.Step, "Steps": j.Steps,
		"StepDescription": j.StepDescription, "Bytes": j.Bytes, "TotalBytes": j.TotalBytes,
		"Message": j.Message, "StartedByUID": j.UID,
	}
}

func propMap(iface string, values map[string]any, constant ...string) prop.Map {
	m := map[string]*prop.Prop{}
	for k, v := range values {
		emit := prop.EmitTrue
		for _, c := range constant {
			if c == k {
				emit = prop.EmitConst
			}
		}
		m[k] = &prop.Prop{Value: v, Emit: emit}
	}
	return prop.Map{iface: m}
}

// update sets only the properties whose value changed: prop emits on every SetMust.
// State and Step go last, so a client that reacts to them reads the other values new.
func (s *Server) update(p *prop.Properties, iface string, values map[string]any) {
	keys := make([]string, 0, len(values))
	for k := range values {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		last := func(k string) bool { return k == "State" || k == "Step" }
		if last(keys[i]) != last(keys[j]) {
			return !last(keys[i])
		}
		return keys[i] < keys[j]
	})
	for _, k := range keys {
		v := values[k]
		if cur, err := p.Get(iface, k); err == nil && fmt.Sprint(cur.Value()) == fmt.Sprint(v) {
			continue
		}
		s.setProp(p, iface, k, v)
	}
}

// setProp stores a read-only property's new value and emits PropertiesChanged. prop has
// no setter for read-only properties that returns an error: SetMust stores the value and
// then panics if the signal cannot be sent. When the bus has gone away that is expected
// (qcryptd connects again and publishes everything anew) and the panic is dropped; on a
// live connection it is a bug and goes on.
func (s *Server) setProp(p *prop.Properties, iface, name string, v any) {
	defer func() {
		if r := recover(); r != nil && s.conn.Connected() {
			panic(r)
		}
	}()
	p.SetMust(iface, name, v)
}

func (s *Server) interfacesAdded(path dbus.ObjectPath, iface string, values map[string]any) {
	vs := map[string]dbus.Variant{}
	for k, v := range values {
		vs[k] = dbus.MakeVariant(v)
	}
	s.conn.Emit(ManagerPath, objectManagerInterface+".InterfacesAdded", path, map[string]map[string]dbus.Variant{iface: vs})
}

// ChainAdded exports a chain object.
func (s *Server) ChainAdded(c ChainInfo) {
	if e := s.exportObject(ChainPath(c.Name), ChainInterface, ChainXML, &chainObject{s, c.Name}, chainProps(c), "Name", "Managed"); e != nil {
		s.mu.Lock()
		s.chains[c.Name] = e
		s.mu.Unlock()
		s.added(e, chainProps(c))
	}
}

// exportObject exports methods, properties and introspection at path.
func (s *Server) exportObject(path dbus.ObjectPath, iface, xml string, methods any, values map[string]any, constant ...string) *exported {
	props, err := s.exportProps(path, propMap(iface, values, constant...))
	if err != nil {
		return nil
	}
	s.conn.Export(methods, path, iface)
	s.conn.Export(introspect.Introspectable(nodeXML([]string{xml}, nil)), path, "org.freedesktop.DBus.Introspectable")
	return &exported{path: path, props: props, iface: iface}
}

// added announces a new object (after it is recorded, so the manager lists it).
func (s *Server) added(e *exported, values map[string]any) {
	s.refreshManagerIntrospection()
	s.interfacesAdded(e.path, e.iface, values)
}

// ChainChanged updates a chain's properties and, when the state changed, signals it.
func (s *Server) ChainChanged(c ChainInfo, previous, reason string) {
	s.mu.Lock()
	e := s.chains[c.Name]
	s.mu.Unlock()
	if e == nil {
		return
	}
	s.update(e.props, ChainInterface, chainProps(c))
	if previous != c.State {
		s.conn.Emit(e.path, ChainInterface+".StateChanged", c.State, previous, reason)
	}
}

// ChainRemoved unexports a chain object.
func (s *Server) ChainRemoved(name string) {
	s.mu.Lock()
	e := s.chains[name]
	delete(s.chains, name)
	s.mu.Unlock()
	if e == nil {
		return
	}
	s.unexport(e.path, ChainInterface)
	s.refreshManagerIntrospection()
}

func (s *Server) unexport(path dbus.ObjectPath, iface string) {
	for _, i := range []string{iface, propertiesInterface, "org.freedesktop.DBus.Introspectable"} {
		s.conn.Export(nil, path, i)
	}
	s.conn.Emit(ManagerPath, objectManagerInterface+".InterfacesRemoved", path, []string{iface})
}

// JobAdded exports a job object.
func (s *Server) JobAdded(j JobInfo) {
	if e := s.exportObject(JobPath(j.ID), JobInterface, JobXML, &jobObject{s, j.ID}, jobProps(j), "Operation", "Chain", "StartedByUID"); e != nil {
		s.mu.Lock()
		s.jobs[j.ID] = e
		s.mu.Unlock()
		s.added(e, jobProps(j))
	}
}

// JobChanged updates a job's properties.
func (s *Server) JobChanged(j JobInfo) {
	s.mu.Lock()
	e := s.jobs[j.ID]
	s.mu.Unlock()
	if e != nil {
		s.update(e.props, JobInterface, jobProps(j))
	}
}

// JobCompleted updates the job and sends Completed.
func (s *Server) JobCompleted(j JobInfo, success bool) {
	s.JobChanged(j)
	s.conn.Emit(JobPath(j.ID), JobInterface+".Completed", success, j.Message)
}

// JobRemoved unexports a finished job.
func (s *Server) JobRemoved(id uint64) {
	s.mu.Lock()
	e := s.jobs[id]
	delete(s.jobs, id)
	s.mu.Unlock()
	if e != nil {
		s.unexport(e.path, JobInterface)
		s.refreshManagerIntrospection()
	}
}

// SummaryChanged updates the manager's Summary.
func (s *Server) SummaryChanged(summary string) {
	if s.manager != nil {
		s.update(s.manager, ManagerInterface, map[string]any{"Summary": summary})
	}
}

// manager carries the Manager interface's methods.
type manager struct{ s *Server }

func (m *manager) ListChains(sender dbus.Sender) ([]struct {
	Name  string
	Path  dbus.ObjectPath
	State string
}, *dbus.Error) {
	if _, err := m.s.caller(sender); err != nil {
		return nil, err
	}
	var out []struct {
		Name  string
		Path  dbus.ObjectPath
		State string
	}
	for _, c := range m.s.backend.ListChains() {
		out = append(out, struct {
			Name  string
			Path  dbus.ObjectPath
			State string
		}{c.Name, ChainPath(c.Name), c.State})
	}
	return out, nil
}

// job checks the caller, starts a job and answers with its path. A refused caller's
// descriptors (in fds, a spec) are closed here; start owns them otherwise.
func (m *manager) job(sender dbus.Sender, fds map[string]dbus.Variant, start func(uid uint32) (uint64, error)) (dbus.ObjectPath, *dbus.Error) {
	uid, derr := m.s.caller(sender)
	if derr != nil {
		CloseFDs(nil, fds)
		return "", derr
	}
	id, err := start(uid)
	if err != nil {
		return "", toDBus(err)
	}
	return JobPath(id), nil
}

func (m *manager) Open(sender dbus.Sender, chain string, options map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	defer CloseFDs(nil, options)
	return m.job(sender, nil, func(uid uint32) (uint64, error) {
		o, err := OpenOptionsFromMap(options)
		if err != nil {
			return 0, err
		}
		return m.s.backend.Open(uid, chain, o)
	})
}

func (m *manager) Close(sender dbus.Sender, chain string, options map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	defer CloseFDs(nil, options)
	return m.job(sender, nil, func(uid uint32) (uint64, error) {
		o, _, err := CloseOptionsFromMap(options, false)
		if err != nil {
			return 0, err
		}
		return m.s.backend.Close(uid, chain, o)
	})
}

func (m *manager) Status(sender dbus.Sender, chain string) (map[string]dbus.Variant, *dbus.Error) {
	if _, err := m.s.caller(sender); err != nil {
		return nil, err
	}
	ctx, cancel := m.s.ctx()
	defer cancel()
	st, err := m.s.backend.Status(ctx, chain)
	if err != nil {
		return nil, toDBus(err)
	}
	return StatusToMap(st), nil
}

func (m *manager) Discover(sender dbus.Sender) ([]map[string]dbus.Variant, *dbus.Error) {
	if _, err := m.s.caller(sender); err != nil {
		return nil, err
	}
	ctx, cancel := m.s.ctx()
	defer cancel()
	found, err := m.s.backend.Discover(ctx)
	if err != nil {
		return nil, toDBus(err)
	}
	out := []map[string]dbus.Variant{}
	for _, d := range found {
		out = append(out, DiscoveredToMap(d))
	}
	return out, nil
}

// OpenAdhoc opens a chain given as a spec; keys to inject come as descriptors and are
// the daemon's to wipe once the job ends.
func (m *manager) OpenAdhoc(sender dbus.Sender, spec, options map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	defer CloseFDs(nil, options)
	return m.job(sender, spec, func(uid uint32) (uint64, error) {
		c, sp, err := SpecFromMap(spec)
		if err != nil {
			return 0, err
		}
		if sp.KeyEntropy != nil || sp.ContainerEntropy != nil || sp.Container != nil || len(sp.Backups) > 0 {
			sp.Close()
			return 0, Errorf(ReasonInvalidArgs, "entropy, work and backup files are for LuksInit")
		}
		o, err := OpenOptionsFromMap(options)
		if err != nil {
			sp.Close()
			return 0, err
		}
		o.InjectKeys = sp.InjectKeys
		id, err := m.s.backend.OpenAdhoc(uid, c, o)
		if err != nil {
			sp.Close()
		}
		return id, err
	})
}

func (m *manager) CloseAdhoc(sender dbus.Sender, spec, options map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	defer CloseFDs(nil, options)
	return m.job(sender, spec, func(uid uint32) (uint64, error) {
		c, sp, err := SpecFromMap(spec)
		if err != nil {
			return 0, err
		}
		sp.Close()
		o, _, err := CloseOptionsFromMap(options, false)
		if err != nil {
			return 0, err
		}
		return m.s.backend.CloseAdhoc(uid, c, o)
	})
}

func (m *manager) StatusAdhoc(sender dbus.Sender, spec map[string]dbus.Variant) (map[string]dbus.Variant, *dbus.Error) {
	if _, err := m.s.caller(sender); err != nil {
		CloseFDs(nil, spec)
		return nil, err
	}
	c, sp, err := SpecFromMap(spec)
	if err != nil {
		return nil, toDBus(err)
	}
	sp.Close()
	ctx, cancel := m.s.ctx()
	defer cancel()
	st, err := m.s.backend.StatusAdhoc(ctx, c)
	if err != nil {
		return nil, toDBus(err)
	}
	return StatusToMap(st), nil
}

func (m *manager) Plan(sender dbus.Sender, operation, chain string, spec, options map[string]dbus.Variant) ([]struct{ VM, Desc string }, *dbus.Error) {
	defer CloseFDs(nil, options)
	if _, err := m.s.caller(sender); err != nil {
		CloseFDs(nil, spec)
		return nil, err
	}
	var c *chains.Chain
	var injected map[string][]byte
	if chain == "" {
		var sp Spec
		var err error
		if c, sp, err = SpecFromMap(spec); err != nil {
			return nil, toDBus(err)
		}
		defer sp.Close()
		injected = sp.InjectKeys
	} else {
		CloseFDs(nil, spec)
	}
	var oo chains.OpenOptions
	var co chains.CloseOptions
	var err error
	switch operation {
	case "open":
		oo, err = OpenOptionsFromMap(options)
		oo.InjectKeys = injected
	case "close":
		co, _, err = CloseOptionsFromMap(options, false)
	default:
		err = Errorf(ReasonInvalidArgs, "operation %q is not open or close", operation)
	}
	if err != nil {
		return nil, toDBus(err)
	}
	plan, err := m.s.backend.Plan(operation, chain, c, oo, co)
	if err != nil {
		return nil, toDBus(err)
	}
	out := []struct{ VM, Desc string }{}
	for _, st := range plan {
		out = append(out, struct{ VM, Desc string }{st.VM, st.Desc})
	}
	return out, nil
}

// LuksInit creates a container; the caller's files (entropy, work file, backups) are
// the daemon's to close once the job ends.
func (m *manager) LuksInit(sender dbus.Sender, spec map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	return m.job(sender, spec, func(uid uint32) (uint64, error) {
		c, sp, err := SpecFromMap(spec)
		if err != nil {
			return 0, err
		}
		if len(sp.InjectKeys) > 0 {
			sp.Close()
			return 0, Errorf(ReasonInvalidArgs, "inject is for OpenAdhoc: luks-init makes the keys")
		}
		is := chains.InitSpec{Chain: c, Size: int64(sp.Size), KeySize: int(sp.KeySize), FS: sp.FS, Autostart: sp.Autostart,
			Container: sp.Container, Backups: map[string]io.Writer{}}
		if sp.KeyEntropy != nil {
			is.KeyEntropy = sp.KeyEntropy
		}
		if sp.ContainerEntropy != nil {
			is.ContainerEntropy = sp.ContainerEntropy
		}
		for vm, f := range sp.Backups {
			is.Backups[vm] = f
		}
		id, err := m.s.backend.LuksInit(uid, is, sp.Close)
		if err != nil {
			sp.Close()
		}
		return id, err
	})
}

func (m *manager) Reload(sender dbus.Sender) (uint32, *dbus.Error) {
	if _, err := m.s.caller(sender); err != nil {
		return 0, err
	}
	n, err := m.s.backend.Reload()
	return uint32(n), toDBus(err)
}

func (m *manager) Check(sender dbus.Sender, target string) (bool, []string, *dbus.Error) {
	uid, err := m.s.caller(sender)
	if err != nil {
		return false, nil, err
	}
	if strings.Contains(target, "/") && uid != 0 {
		// qcryptd would read any directory as root and show its contents in errors.
		return false, nil, toDBus(fmt.Errorf("%w: only root may have qcryptd check a directory; qcryptctl checks it with your own rights", ErrAccessDenied))
	}
	ok, errs := m.s.backend.Check(target)
	if errs == nil {
		errs = []string{}
	}
	return ok, errs, nil
}

func (m *manager) CloseAll(sender dbus.Sender, options map[string]dbus.Variant) ([]dbus.ObjectPath, *dbus.Error) {
	defer CloseFDs(nil, options)
	uid, derr := m.s.caller(sender)
	if derr != nil {
		return nil, derr
	}
	o, stop, err := CloseOptionsFromMap(options, true)
	if err != nil {
		return nil, toDBus(err)
	}
	ids, err := m.s.backend.CloseAll(uid, o, stop)
	paths := []dbus.ObjectPath{}
	for _, id := range ids {
		paths = append(paths, JobPath(id))
	}
	return paths, toDBus(err)
}

// chainObject carries the Chain interface's methods.
type chainObject struct {
	s    *Server
	name string
}

func (c *chainObject) Open(sender dbus.Sender, options map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	return (&manager{c.s}).Open(sender, c.name, options)
}

func (c *chainObject) Close(sender dbus.Sender, options map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	return (&manager{c.s}).Close(sender, c.name, options)
}

func (c *chainObject) Status(sender dbus.Sender) (map[string]dbus.Variant, *dbus.Error) {
	return (&manager{c.s}).Status(sender, c.name)
}

// jobObject carries the Job interface's methods.
type jobObject struct {
	s  *Server
	id uint64
}

func (j *jobObject) Cancel(sender dbus.Sender) *dbus.Error {
	uid, derr := j.s.caller(sender)
	if derr != nil {
		return derr
	}
	return toDBus(j.s.backend.CancelJob(uid, j.id))
}

// objectManager implements org.freedesktop.DBus.ObjectManager for chains and jobs.
type objectManager struct{ s *Server }

func (o *objectManager) GetManagedObjects(sender dbus.Sender) (map[dbus.ObjectPath]map[string]map[string]dbus.Variant, *dbus.Error) {
	if _, err := o.s.caller(sender); err != nil {
		return nil, err
	}
	out := map[dbus.ObjectPath]map[string]map[string]dbus.Variant{}
	o.s.mu.Lock()
	objs := make([]*exported, 0, len(o.s.chains)+len(o.s.jobs))
	for _, e := range o.s.chains {
		objs = append(objs, e)
	}
	for _, e := range o.s.jobs {
		objs = append(objs, e)
	}
	o.s.mu.Unlock()
	for _, e := range objs {
		all, derr := e.props.GetAll(e.iface)
		if derr != nil {
			continue
		}
		out[e.path] = map[string]map[string]dbus.Variant{e.iface: all}
	}
	return out, nil
}
