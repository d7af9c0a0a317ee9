package dbusapi

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/qubes"
)

// ChainInfo is what the bus shows of a chain.
type ChainInfo struct {
	Name, State, Waiting, LastError, Target, MountPoint string
	Step, Steps                                         uint32
	LastChange, RetryAt                                 time.Time
	Managed, Autostart, ReadOnly                        bool
	Layers                                              []string
}

// JobInfo is what the bus shows of a job.
type JobInfo struct {
	ID                                       uint64
	Operation, Chain, State, StepDescription string
	Message                                  string
	Step, Steps                              uint32
	Bytes, TotalBytes                        uint64
	UID                                      uint32
}

// Discovered is an open chain found on the system and the configured chain it is, if any.
type Discovered struct {
	chains.Discovered
	Managed string
}

// Backend is what the daemon offers the bus. Methods that start work return a job id at
// once; the work runs in the daemon's event loop.
type Backend interface {
	ListChains() []ChainInfo
	Open(uid uint32, name string, o chains.OpenOptions) (uint64, error)
	Close(uid uint32, name string, o chains.CloseOptions) (uint64, error)
	Status(ctx context.Context, name string) (*chains.Status, error)
	Discover(ctx context.Context) ([]Discovered, error)
	// OpenAdhoc wipes o.InjectKeys when the job ends.
	OpenAdhoc(uid uint32, c *chains.Chain, o chains.OpenOptions) (uint64, error)
	CloseAdhoc(uid uint32, c *chains.Chain, o chains.CloseOptions) (uint64, error)
	StatusAdhoc(ctx context.Context, c *chains.Chain) (*chains.Status, error)
	Plan(op, name string, c *chains.Chain, oo chains.OpenOptions, co chains.CloseOptions) (chains.Plan, error)
	// LuksInit owns the caller's files from here: release closes them when done.
	LuksInit(uid uint32, spec chains.InitSpec, release func()) (uint64, error)
	Reload() (int, error)
	Check(target string) (bool, []string)
	CloseAll(uid uint32, o chains.CloseOptions, stop bool) ([]uint64, error)
	CancelJob(uid uint32, id uint64) error
	Info() (version, target, summary string)
}

// StatusToMap renders a status for the bus.
func StatusToMap(st *chains.Status) map[string]dbus.Variant {
	hops := make([]map[string]dbus.Variant, len(st.Hops))
	for i, h := range st.Hops {
		hops[i] = map[string]dbus.Variant{
			"vm": dbus.MakeVariant(h.VM), "running": dbus.MakeVariant(h.Running), "attached": dbus.MakeVariant(h.Attached),
			"frontend_dev": dbus.MakeVariant(h.FrontendDev), "key_present": dbus.MakeVariant(h.KeyPresent),
			"decrypted": dbus.MakeVariant(h.Decrypted), "mounted": dbus.MakeVariant(h.Mounted),
		}
	}
	return map[string]dbus.Variant{
		"chain": dbus.MakeVariant(st.Chain), "source_vm": dbus.MakeVariant(st.SourceVM),
		"source_running": dbus.MakeVariant(st.SourceRunning), "source": dbus.MakeVariant(st.Source),
		"missing": dbus.MakeVariant(int32(st.Missing)), "problem": dbus.MakeVariant(st.Problem),
		"other": dbus.MakeVariant(st.Other), "hops": dbus.MakeVariant(hops),
	}
}

// StatusFromMap is the client side of StatusToMap.
func StatusFromMap(m map[string]dbus.Variant) (*chains.Status, error) {
	st := &chains.Status{}
	var hops []map[string]dbus.Variant
	var missing int32
	if err := fields(m, map[string]any{"chain": &st.Chain, "source_vm": &st.SourceVM, "source_running": &st.SourceRunning,
		"source": &st.Source, "missing": &missing, "problem": &st.Problem, "hops": &hops}); err != nil {
		return nil, err
	}
	st.Missing = int(missing)
	if err := optional(m, "other", &st.Other); err != nil {
		return nil, err
	}
	cleanAll(&st.Chain, &st.SourceVM, &st.Source, &st.Problem, &st.Other)
	for _, h := range hops {
		var hs chains.HopStatus
		if err := fields(h, map[string]any{"vm": &hs.VM, "running": &hs.Running, "attached": &hs.Attached,
			"frontend_dev": &hs.FrontendDev, "key_present": &hs.KeyPresent, "decrypted": &hs.Decrypted, "mounted": &hs.Mounted}); err != nil {
			return nil, err
		}
		cleanAll(&hs.VM, &hs.FrontendDev)
		st.Hops = append(st.Hops, hs)
	}
	return st, nil
}

// DiscoveredToMap renders a discovered chain.
func DiscoveredToMap(d Discovered) map[string]dbus.Variant {
	var vms, devs, ports []string
	for _, h := range d.Hops {
		vms, devs, ports = append(vms, h.VM), append(devs, h.FrontendDev), append(ports, h.Port)
	}
	return map[string]dbus.Variant{
		"source_vm": dbus.MakeVariant(d.SourceVM), "source_port": dbus.MakeVariant(d.SourcePort),
		"file": dbus.MakeVariant(d.File), "key": dbus.MakeVariant(d.Key), "read_only": dbus.MakeVariant(d.ReadOnly),
		"hops": dbus.MakeVariant(vms), "frontend_devs": dbus.MakeVariant(devs), "ports": dbus.MakeVariant(ports),
		"managed": dbus.MakeVariant(d.Managed),
	}
}

// DiscoveredFromMap is the client side of DiscoveredToMap.
func DiscoveredFromMap(m map[string]dbus.Variant) (Discovered, error) {
	var d Discovered
	var vms, devs, ports []string
	if err := fields(m, map[string]any{"source_vm": &d.SourceVM, "source_port": &d.SourcePort, "file": &d.File, "key": &d.Key,
		"read_only": &d.ReadOnly, "hops": &vms, "frontend_devs": &devs, "ports": &ports, "managed": &d.Managed}); err != nil {
		return d, err
	}
	if len(devs) != len(vms) || len(ports) != len(vms) {
		return d, fmt.Errorf("inconsistent discovered chain")
	}
	cleanAll(&d.SourceVM, &d.SourcePort, &d.File, &d.Key, &d.Managed)
	for i := range vms {
		d.Hops = append(d.Hops, chains.DiscoveredHop{VM: Clean(vms[i]), FrontendDev: Clean(devs[i]), Port: Clean(ports[i])})
	}
	return d, nil
}

// fields stores m[k] into each pointer; missing keys are an error, unknown keys are not.
func fields(m map[string]dbus.Variant, into map[string]any) error {
	for k, p := range into {
		v, ok := m[k]
		if !ok {
			return fmt.Errorf("field %s is missing", k)
		}
		if err := v.Store(p); err != nil {
			return fmt.Errorf("field %s: %w", k, err)
		}
	}
	return nil
}

// optional stores m[k] into p when present and reports a type mismatch by name.
func optional(m map[string]dbus.Variant, k string, p any) error {
	v, ok := m[k]
	if !ok {
		return nil
	}
	if err := v.Store(p); err != nil {
		return Errorf(ReasonInvalidArgs, "option %s: wrong type %s", k, v.Signature())
	}
	return nil
}

func knownKeys(m map[string]dbus.Variant, what string, known ...string) error {
	for k := range m {
		ok := false
		for _, n := range known {
			ok = ok || n == k
		}
		if !ok {
			return Errorf(ReasonInvalidArgs, "unknown %s %q", what, qubes.Printable(k, 40))
		}
	}
	return nil
}

// OpenOptionsFromMap decodes Open's options.
func OpenOptionsFromMap(m map[string]dbus.Variant) (chains.OpenOptions, error) {
	var o chains.OpenOptions
	if err := knownKeys(m, "option", "force", "autostart", "break_lock"); err != nil {
		return o, err
	}
	if err := optional(m, "force", &o.Force); err != nil {
		return o, err
	}
	if err := optional(m, "break_lock", &o.BreakLock); err != nil {
		return o, err
	}
	return o, optional(m, "autostart", &o.Autostart)
}

// CloseOptionsFromMap decodes Close's options (stop only where allowed).
func CloseOptionsFromMap(m map[string]dbus.Variant, allowStop bool) (chains.CloseOptions, bool, error) {
	var o chains.CloseOptions
	var stop bool
	known := []string{"force", "shutdown_target", "eject"}
	if allowStop {
		known = append(known, "stop")
	}
	if err := knownKeys(m, "option", known...); err != nil {
		return o, false, err
	}
	for k, p := range map[string]any{"force": &o.Force, "shutdown_target": &o.ShutdownTarget, "eject": &o.Eject, "stop": &stop} {
		if err := optional(m, k, p); err != nil {
			return o, false, err
		}
	}
	return o, stop, nil
}

// OpenOptionsToMap encodes open options as the a{sv} of Open and OpenAdhoc.
func OpenOptionsToMap(o chains.OpenOptions) map[string]dbus.Variant {
	return map[string]dbus.Variant{"force": dbus.MakeVariant(o.Force), "autostart": dbus.MakeVariant(o.Autostart), "break_lock": dbus.MakeVariant(o.BreakLock)}
}

// CloseOptionsToMap encodes close options as the a{sv} of Close and CloseAdhoc.
func CloseOptionsToMap(o chains.CloseOptions) map[string]dbus.Variant {
	return map[string]dbus.Variant{"force": dbus.MakeVariant(o.Force), "shutdown_target": dbus.MakeVariant(o.ShutdownTarget), "eject": dbus.MakeVariant(o.Eject)}
}

// Spec is an ad-hoc chain (and, for luks-init, the container to create). dom0 files
// travel as descriptors the client opened with the caller's rights, never as paths.
type Spec struct {
	SourceVM, File, Key string
	Destinations        []string
	Inject              map[string]*os.File // qube -> dom0 key file to inject if it has none
	CryptOptions        map[string]string   // qube -> cryptsetup options
	MountPoint          string
	MountAnywhere       bool // status: mounted anywhere counts (the original's --mp "")
	ReadOnly, Autostart bool
	// luks-init
	Size                         uint64
	KeySize                      uint32
	FS                           string
	KeyEntropy, ContainerEntropy *os.File            // nil: qcryptd's /dev/random, /dev/urandom
	Container                    *os.File            // a new empty file to build in; nil: qcryptd's private tmpfs
	Backups                      map[string]*os.File // qube -> new empty file for its key's backup

	// InjectKeys is what qcryptd read from Inject (server side).
	InjectKeys map[string][]byte
}

var specKeys = []string{"source_vm", "file", "key", "destinations", "inject", "crypt_options", "mount_point", "mount_anywhere", "read_only", "autostart",
	"size", "key_size", "fs", "key_entropy", "container_entropy", "container_file", "backups"}

func fdVariant(f *os.File) dbus.Variant { return dbus.MakeVariant(dbus.UnixFD(f.Fd())) }

func fdMap(files map[string]*os.File) map[string]dbus.Variant {
	m := map[string]dbus.Variant{}
	for k, f := range files {
		m[k] = fdVariant(f)
	}
	return m
}

// ToMap renders a spec for the bus (empty fields left out).
func (s Spec) ToMap() map[string]dbus.Variant {
	m := map[string]dbus.Variant{"source_vm": dbus.MakeVariant(s.SourceVM), "file": dbus.MakeVariant(s.File),
		"key": dbus.MakeVariant(s.Key), "destinations": dbus.MakeVariant(s.Destinations),
		"read_only": dbus.MakeVariant(s.ReadOnly), "autostart": dbus.MakeVariant(s.Autostart)}
	if len(s.Inject) > 0 {
		m["inject"] = dbus.MakeVariant(fdMap(s.Inject))
	}
	if len(s.Backups) > 0 {
		m["backups"] = dbus.MakeVariant(fdMap(s.Backups))
	}
	for k, f := range map[string]*os.File{"key_entropy": s.KeyEntropy, "container_entropy": s.ContainerEntropy, "container_file": s.Container} {
		if f != nil {
			m[k] = fdVariant(f)
		}
	}
	if len(s.CryptOptions) > 0 {
		m["crypt_options"] = dbus.MakeVariant(s.CryptOptions)
	}
	if s.MountAnywhere {
		m["mount_anywhere"] = dbus.MakeVariant(true)
	}
	for k, v := range map[string]string{"mount_point": s.MountPoint, "fs": s.FS} {
		if v != "" {
			m[k] = dbus.MakeVariant(v)
		}
	}
	if s.Size != 0 {
		m["size"] = dbus.MakeVariant(s.Size)
	}
	if s.KeySize != 0 {
		m["key_size"] = dbus.MakeVariant(s.KeySize)
	}
	return m
}

// Close closes the files of a received spec and forgets its keys.
func (s *Spec) Close() {
	for _, f := range []*os.File{s.KeyEntropy, s.ContainerEntropy, s.Container} {
		if f != nil {
			f.Close()
		}
	}
	for _, f := range s.Backups {
		f.Close()
	}
	for _, k := range s.InjectKeys {
		clear(k)
	}
}

// receiveFDs takes the descriptors of a spec: keys to inject are read at once, the
// luks-init files are checked and kept.
func (s *Spec) receiveFDs(m map[string]dbus.Variant, taken map[dbus.UnixFD]bool) error {
	seen := map[dbus.UnixFD]bool{}
	fd := func(v dbus.Variant, what string) (dbus.UnixFD, error) {
		x, ok := v.Value().(dbus.UnixFD)
		if !ok {
			return 0, Errorf(ReasonInvalidArgs, "%s: wrong type %s, want a file descriptor (h)", what, v.Signature())
		}
		if seen[x] {
			return 0, Errorf(ReasonInvalidArgs, "%s: the same descriptor is passed twice", what)
		}
		seen[x] = true
		return x, nil
	}
	fdsOf := func(key string) (map[string]dbus.UnixFD, error) {
		v, ok := m[key]
		if !ok {
			return nil, nil
		}
		inner, ok := v.Value().(map[string]dbus.Variant)
		if !ok {
			return nil, Errorf(ReasonInvalidArgs, "%s: wrong type %s, want a{sv} of file descriptors", key, v.Signature())
		}
		out := map[string]dbus.UnixFD{}
		for vm, iv := range inner {
			x, err := fd(iv, key+" "+qubes.Printable(vm, 40))
			if err != nil {
				return nil, err
			}
			out[vm] = x
		}
		return out, nil
	}
	inject, err := fdsOf("inject")
	if err != nil {
		return err
	}
	for vm, x := range inject {
		taken[x] = true // readKey closes it, read or refused
		key, err := readKey(x, qubes.Printable(vm, 40))
		if err != nil {
			return err
		}
		if s.InjectKeys == nil {
			s.InjectKeys = map[string][]byte{}
		}
		s.InjectKeys[vm] = key
	}
	backups, err := fdsOf("backups")
	if err != nil {
		return err
	}
	for vm, x := range backups {
		taken[x] = true // checkFD wraps it, or closes it when refused
		f, err := checkFD(x, fdNewFile, "backup for "+qubes.Printable(vm, 40))
		if err != nil {
			return err
		}
		if s.Backups == nil {
			s.Backups = map[string]*os.File{}
		}
		s.Backups[vm] = f
	}
	for key, into := range map[string]struct {
		f    **os.File
		kind fdKind
	}{"key_entropy": {&s.KeyEntropy, fdRead}, "container_entropy": {&s.ContainerEntropy, fdRead}, "container_file": {&s.Container, fdContainer}} {
		v, ok := m[key]
		if !ok {
			continue
		}
		x, err := fd(v, key)
		if err != nil {
			return err
		}
		taken[x] = true
		if *into.f, err = checkFD(x, into.kind, key); err != nil {
			return err
		}
	}
	return nil
}

// SpecFromMap decodes and validates a spec into a chain (and the luks-init fields).
func SpecFromMap(m map[string]dbus.Variant) (*chains.Chain, Spec, error) {
	var s Spec
	if err := knownKeys(m, "spec field", specKeys...); err != nil {
		CloseFDs(nil, m)
		return nil, s, err
	}
	// Every descriptor is taken (or closed) first, so none leaks on a refusal below.
	taken := map[dbus.UnixFD]bool{}
	if err := s.receiveFDs(m, taken); err != nil {
		CloseFDs(taken, m)
		s.Close()
		return nil, Spec{}, err
	}
	c, err := s.chain(m)
	if err != nil {
		CloseFDs(taken, m) // any in a field of the wrong type
		s.Close()
		return nil, Spec{}, err
	}
	return c, s, nil
}

// chain decodes the plain fields and validates the chain they describe.
func (s *Spec) chain(m map[string]dbus.Variant) (*chains.Chain, error) {
	for k, p := range map[string]any{"source_vm": &s.SourceVM, "file": &s.File, "key": &s.Key, "destinations": &s.Destinations,
		"crypt_options": &s.CryptOptions, "mount_point": &s.MountPoint, "mount_anywhere": &s.MountAnywhere, "read_only": &s.ReadOnly,
		"autostart": &s.Autostart, "size": &s.Size, "key_size": &s.KeySize, "fs": &s.FS} {
		if err := optional(m, k, p); err != nil {
			return nil, err
		}
	}
	c := &chains.Chain{SourceVM: s.SourceVM, SourceFile: s.File, Key: s.Key, MountPoint: s.MountPoint,
		MountAnywhere: s.MountAnywhere && s.MountPoint == "", ReadOnly: s.ReadOnly, Autostart: s.Autostart, Type: "luks"}
	for _, vm := range s.Destinations {
		h := chains.Hop{VM: vm}
		if o := s.CryptOptions[vm]; o != "" {
			opts, err := chains.ParseCryptOptions(o)
			if err != nil {
				return nil, Errorf(ReasonInvalidArgs, "crypt_options of %s: %v", vm, err)
			}
			h.Options = opts
		}
		c.Hops = append(c.Hops, h)
	}
	for what, vms := range map[string][]string{"inject": keysOf(s.InjectKeys), "backups": keysOf(s.Backups), "crypt_options": keysOf(s.CryptOptions)} {
		for _, vm := range vms {
			if !c.Involves(vm) || vm == c.SourceVM {
				return nil, Errorf(ReasonInvalidArgs, "%s: %s is not a destination", what, qubes.Printable(vm, 40))
			}
		}
	}
	if err := c.Validate(); err != nil {
		return nil, Errorf(ReasonInvalidArgs, "%v", err)
	}
	c.Name = chains.AdhocName(c)
	return c, nil
}

func keysOf[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
