package dbusapi

import (
	"fmt"
	"io"
	"strings"

	"github.com/godbus/dbus/v5"

	"github.com/qcrypt/qcrypt/chains"
)

// The method handlers: each checks the caller, decodes its arguments and hands the work
// to the Backend; none touches state.

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
		}{c.Name, ChainPath(c.Name), string(c.State)})
	}
	return out, nil
}

// job checks the caller, starts a job and answers with its path.
func (m *manager) job(sender dbus.Sender, start func(uid uint32) (uint64, error)) (dbus.ObjectPath, *dbus.Error) {
	uid, derr := m.s.caller(sender)
	if derr != nil {
		return "", derr
	}
	id, err := start(uid)
	if err != nil {
		return "", toDBus(err)
	}
	return JobPath(id), nil
}

func (m *manager) Open(sender dbus.Sender, chain string, options map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	return m.job(sender, func(uid uint32) (uint64, error) {
		o, err := OpenOptionsFromMap(options)
		if err != nil {
			return 0, err
		}
		return m.s.backend.Open(uid, chain, o)
	})
}

func (m *manager) Close(sender dbus.Sender, chain string, options map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	return m.job(sender, func(uid uint32) (uint64, error) {
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
	return m.job(sender, func(uid uint32) (uint64, error) {
		c, sp, err := SpecFromMap(spec)
		if err != nil {
			return 0, err
		}
		if sp.KeyEntropy != nil || sp.ContainerEntropy != nil || sp.Container != nil || len(sp.Backups) > 0 {
			sp.Close()
			return 0, Errorf(InvalidArgs, "entropy, work and backup files are for LuksInit")
		}
		o, err := OpenOptionsFromMap(options)
		if err != nil {
			sp.Close()
			return 0, err
		}
		o.InjectKeys, o.InjectStores = sp.InjectKeys, sp.InjectKeystore
		id, err := m.s.backend.OpenAdhoc(uid, c, o)
		if err != nil {
			sp.Close()
		}
		return id, err
	})
}

func (m *manager) CloseAdhoc(sender dbus.Sender, spec, options map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	return m.job(sender, func(uid uint32) (uint64, error) {
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
	if _, err := m.s.caller(sender); err != nil {
		return nil, err
	}
	var c *chains.Chain
	var injected map[string][]byte
	var stores map[string]string
	if chain == "" {
		var sp Spec
		var err error
		if c, sp, err = SpecFromMap(spec); err != nil {
			return nil, toDBus(err)
		}
		defer sp.Close()
		injected, stores = sp.InjectKeys, sp.InjectKeystore
	}
	var oo chains.OpenOptions
	var co chains.CloseOptions
	var err error
	switch JobOperation(operation) {
	case OpOpen:
		oo, err = OpenOptionsFromMap(options)
		oo.InjectKeys, oo.InjectStores = injected, stores
	case OpClose:
		co, _, err = CloseOptionsFromMap(options, false)
	default:
		err = Errorf(InvalidArgs, "operation %s is not open or close", chains.Quote(operation))
	}
	if err != nil {
		return nil, toDBus(err)
	}
	plan, err := m.s.backend.Plan(JobOperation(operation), chain, c, oo, co)
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
	return m.job(sender, func(uid uint32) (uint64, error) {
		c, sp, err := SpecFromMap(spec)
		if err != nil {
			return 0, err
		}
		if len(sp.InjectKeys) > 0 {
			sp.Close()
			return 0, Errorf(InvalidArgs, "inject is for OpenAdhoc: luks-init makes the keys")
		}
		is := chains.InitSpec{Chain: c, Size: int64(sp.Size), KeySize: int(sp.KeySize), FS: sp.FS, Autostart: sp.Autostart,
			Container: sp.Container, Backups: map[string]io.Writer{}}
		if sp.Keystore != "" {
			is.Keystore = &chains.Keystore{Dir: sp.Keystore} // checked by the daemon, for the caller
		}
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

func (m *manager) KeystoreUnlock(sender dbus.Sender, store string) (dbus.ObjectPath, *dbus.Error) {
	return m.job(sender, func(uid uint32) (uint64, error) { return m.s.backend.KeystoreUnlock(uid, store) })
}

func (m *manager) KeystoreLock(sender dbus.Sender, store string) (dbus.ObjectPath, *dbus.Error) {
	return m.job(sender, func(uid uint32) (uint64, error) { return m.s.backend.KeystoreLock(uid, store) })
}

func (m *manager) KeystoreInit(sender dbus.Sender, store string) (dbus.ObjectPath, *dbus.Error) {
	return m.job(sender, func(uid uint32) (uint64, error) { return m.s.backend.KeystoreInit(uid, store) })
}

func (m *manager) KeystoreStatus(sender dbus.Sender, store string) (map[string]dbus.Variant, *dbus.Error) {
	uid, derr := m.s.caller(sender)
	if derr != nil {
		return nil, derr
	}
	ctx, cancel := m.s.ctx()
	defer cancel()
	st, err := m.s.backend.KeystoreStatus(ctx, uid, store)
	if err != nil {
		return nil, toDBus(err)
	}
	return keystoreCodec.encode(&st), nil
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
