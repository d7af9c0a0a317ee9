package dbusapi

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"
	"github.com/godbus/dbus/v5/prop"
	"github.com/sirupsen/logrus"
)

// The publishing side of Server: the daemon's Publisher, which shows state changes as
// objects, properties and signals. Every export and signal is checked: what does not
// reach the bus is logged.

// refreshManagerIntrospection lists the manager's children (chain, job) when that set
// changes: only when the first object of a kind appears or the last goes.
func (s *Server) refreshManagerIntrospection() error {
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
		return nil
	}
	s.mu.Unlock()
	node := introspect.Introspectable(nodeXML([]string{ManagerXML, objectManagerXML}, children))
	if err := s.conn.Export(node, ManagerPath, introspectableInterface); err != nil {
		return fmt.Errorf("cannot export the manager's introspection: %w", err)
	}
	s.mu.Lock()
	s.introspected, s.exportedOnce = key, true
	s.mu.Unlock()
	return nil
}

// failed logs a publication that did not reach the bus. On a closed connection that is
// expected: qcryptd connects again and publishes everything anew.
func (s *Server) failed(err error, fields logrus.Fields, what string) {
	entry := s.Log.WithFields(fields).WithError(err)
	if !s.conn.Connected() {
		entry.Debug(what + " (no bus)")
		return
	}
	entry.Error(what)
}

func (s *Server) emit(fields logrus.Fields, path dbus.ObjectPath, signal string, args ...any) {
	if err := s.conn.Emit(path, signal, args...); err != nil {
		s.failed(err, fields, "cannot send "+signal)
	}
}

func (s *Server) refreshed(fields logrus.Fields) {
	if err := s.refreshManagerIntrospection(); err != nil {
		s.failed(err, fields, "cannot update the manager's introspection")
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

// ChainAdded exports a chain object.
func (s *Server) ChainAdded(c ChainInfo) {
	s.addObject(logrus.Fields{"chain": c.Name}, ChainPath(c.Name), ChainInterface, ChainXML, &chainObject{s, c.Name},
		chainInfoCodec.values(&c), func(e *exported) { s.chains[c.Name] = e }, "Name", "Managed")
}

// addObject exports an object, records it (record runs under the lock) and announces it.
// One that cannot be exported is logged and left out: what it shows runs on and is
// published again when qcryptd reconnects or reloads.
func (s *Server) addObject(fields logrus.Fields, path dbus.ObjectPath, iface, xml string, methods any, values map[string]any,
	record func(*exported), constant ...string) {
	e, err := s.exportObject(path, iface, xml, methods, values, constant...)
	if err != nil {
		s.failed(err, fields, "cannot export "+string(path))
		return
	}
	s.mu.Lock()
	record(e)
	s.mu.Unlock()
	s.added(fields, e, values)
}

// exportObject exports methods, properties and introspection at path; on a failure
// nothing of it stays exported.
func (s *Server) exportObject(path dbus.ObjectPath, iface, xml string, methods any, values map[string]any, constant ...string) (*exported, error) {
	props, err := s.exportProps(path, propMap(iface, values, constant...))
	if err == nil {
		err = s.conn.Export(methods, path, iface)
	}
	if err == nil {
		err = s.conn.Export(introspect.Introspectable(nodeXML([]string{xml}, nil)), path, introspectableInterface)
	}
	if err != nil {
		_ = s.unexportAll(path, iface) // undo what was exported; the first error is told
		return nil, fmt.Errorf("cannot export %s: %w", path, err)
	}
	return &exported{path: path, props: props, iface: iface}, nil
}

// added announces a new object (after it is recorded, so the manager lists it).
func (s *Server) added(fields logrus.Fields, e *exported, values map[string]any) {
	s.refreshed(fields)
	vs := map[string]dbus.Variant{}
	for k, v := range values {
		vs[k] = dbus.MakeVariant(v)
	}
	s.emit(fields, ManagerPath, objectManagerInterface+".InterfacesAdded", e.path, map[string]map[string]dbus.Variant{e.iface: vs})
}

// ChainChanged updates a chain's properties and, when the state changed, signals it.
func (s *Server) ChainChanged(c ChainInfo, previous ChainState, why Reason) {
	s.mu.Lock()
	e := s.chains[c.Name]
	s.mu.Unlock()
	if e == nil {
		return
	}
	s.update(e.props, ChainInterface, chainInfoCodec.values(&c))
	if previous != c.State {
		s.emit(logrus.Fields{"chain": c.Name}, e.path, ChainInterface+".StateChanged", c.State, previous, why.Cause, why.Text)
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
	s.unexport(logrus.Fields{"chain": name}, e.path, ChainInterface)
}

// unexport removes an object and announces it.
func (s *Server) unexport(fields logrus.Fields, path dbus.ObjectPath, iface string) {
	if err := s.unexportAll(path, iface); err != nil {
		s.failed(err, fields, "cannot unexport")
	}
	s.emit(fields, ManagerPath, objectManagerInterface+".InterfacesRemoved", path, []string{iface})
	s.refreshed(fields)
}

func (s *Server) unexportAll(path dbus.ObjectPath, iface string) error {
	var errs []error
	for _, i := range []string{iface, propertiesInterface, introspectableInterface} {
		errs = append(errs, s.conn.Export(nil, path, i))
	}
	return errors.Join(errs...)
}

// JobAdded exports a job object.
func (s *Server) JobAdded(j JobInfo) {
	s.addObject(logrus.Fields{"job": j.ID, "chain": j.Chain}, JobPath(j.ID), JobInterface, JobXML, &jobObject{s, j.ID},
		jobInfoCodec.values(&j), func(e *exported) { s.jobs[j.ID] = e }, "Operation", "Chain", "StartedByUID")
}

// JobChanged updates a job's properties.
func (s *Server) JobChanged(j JobInfo) {
	s.mu.Lock()
	e := s.jobs[j.ID]
	s.mu.Unlock()
	if e != nil {
		s.update(e.props, JobInterface, jobInfoCodec.values(&j))
	}
}

// JobCompleted updates the job and sends Completed.
func (s *Server) JobCompleted(j JobInfo, success bool) {
	s.JobChanged(j)
	s.emit(logrus.Fields{"job": j.ID, "chain": j.Chain}, JobPath(j.ID), JobInterface+".Completed", success, j.Message)
}

// JobRemoved unexports a finished job.
func (s *Server) JobRemoved(id uint64) {
	s.mu.Lock()
	e := s.jobs[id]
	delete(s.jobs, id)
	s.mu.Unlock()
	if e != nil {
		s.unexport(logrus.Fields{"job": id}, e.path, JobInterface)
	}
}

// SummaryChanged updates the manager's Summary.
func (s *Server) SummaryChanged(summary string) {
	if s.manager != nil {
		s.update(s.manager, ManagerInterface, map[string]any{"Summary": summary})
	}
}
