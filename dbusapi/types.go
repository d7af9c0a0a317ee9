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
	Name                                   string
	State                                  ChainState
	Waiting, LastError, Target, MountPoint string
	Step, Steps                            uint32
	LastChange, RetryAt                    time.Time
	Managed, Autostart, ReadOnly           bool
	Layers                                 []string
}

// JobInfo is what the bus shows of a job.
type JobInfo struct {
	ID                     uint64
	Operation              JobOperation
	State                  JobState
	Chain, StepDescription string
	Message                string
	Step, Steps            uint32
	Bytes, TotalBytes      uint64
	UID                    uint32
}

// Discovered is an open chain found on the system and the configured chain it is, if any.
type Discovered struct {
	chains.Discovered
	ManagedBy string // the configured chain it is; "" for none
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
	Plan(op JobOperation, name string, c *chains.Chain, oo chains.OpenOptions, co chains.CloseOptions) (chains.Plan, error)
	// LuksInit owns the caller's files from here: release closes them when done.
	LuksInit(uid uint32, spec chains.InitSpec, release func()) (uint64, error)
	Reload() (int, error)
	Check(target string) (bool, []string)
	CloseAll(uid uint32, o chains.CloseOptions, stop bool) ([]uint64, error)
	CancelJob(uid uint32, id uint64) error
	Info() (version, target, summary string)
	// The blib key store, named by its directory ("" is the default store).
	KeystoreUnlock(uid uint32, dir string) (uint64, error)
	KeystoreLock(uid uint32, dir string) (uint64, error)
	KeystoreInit(uid uint32, dir string) (uint64, error)
	KeystoreStatus(ctx context.Context, uid uint32, dir string) (chains.KeystoreState, error)
}

// chainInfoCodec is a chain object's properties.
var chainInfoCodec = codec[ChainInfo]{
	{key: "Name", ref: func(c *ChainInfo) any { return &c.Name }},
	{key: "State", ref: func(c *ChainInfo) any { return &c.State }},
	{key: "Waiting", ref: func(c *ChainInfo) any { return &c.Waiting }},
	{key: "Step", ref: func(c *ChainInfo) any { return &c.Step }},
	{key: "Steps", ref: func(c *ChainInfo) any { return &c.Steps }},
	{key: "LastError", ref: func(c *ChainInfo) any { return &c.LastError }},
	usec("LastChange", func(c *ChainInfo) *time.Time { return &c.LastChange }),
	usec("RetryAt", func(c *ChainInfo) *time.Time { return &c.RetryAt }),
	{key: "Managed", ref: func(c *ChainInfo) any { return &c.Managed }},
	{key: "Autostart", ref: func(c *ChainInfo) any { return &c.Autostart }},
	{key: "ReadOnly", ref: func(c *ChainInfo) any { return &c.ReadOnly }},
	{key: "Layers", ref: func(c *ChainInfo) any {
		if c.Layers == nil {
			c.Layers = []string{} // "as" even when empty
		}
		return &c.Layers
	}},
	{key: "Target", ref: func(c *ChainInfo) any { return &c.Target }},
	{key: "MountPoint", ref: func(c *ChainInfo) any { return &c.MountPoint }},
}

// jobInfoCodec is a job object's properties (its ID is in its path).
var jobInfoCodec = codec[JobInfo]{
	{key: "Operation", ref: func(j *JobInfo) any { return &j.Operation }},
	{key: "Chain", ref: func(j *JobInfo) any { return &j.Chain }},
	{key: "State", ref: func(j *JobInfo) any { return &j.State }},
	{key: "Step", ref: func(j *JobInfo) any { return &j.Step }},
	{key: "Steps", ref: func(j *JobInfo) any { return &j.Steps }},
	{key: "StepDescription", ref: func(j *JobInfo) any { return &j.StepDescription }},
	{key: "Bytes", ref: func(j *JobInfo) any { return &j.Bytes }},
	{key: "TotalBytes", ref: func(j *JobInfo) any { return &j.TotalBytes }},
	{key: "Message", ref: func(j *JobInfo) any { return &j.Message }},
	{key: "StartedByUID", ref: func(j *JobInfo) any { return &j.UID }},
}

var hopStatusCodec = codec[chains.HopStatus]{
	{key: "vm", ref: func(h *chains.HopStatus) any { return &h.VM }},
	{key: "running", ref: func(h *chains.HopStatus) any { return &h.Running }},
	{key: "attached", ref: func(h *chains.HopStatus) any { return &h.Attached }},
	{key: "frontend_dev", ref: func(h *chains.HopStatus) any { return &h.FrontendDev }},
	{key: "key_present", ref: func(h *chains.HopStatus) any { return &h.KeyPresent }},
	{key: "decrypted", ref: func(h *chains.HopStatus) any { return &h.Decrypted }},
	{key: "mounted", ref: func(h *chains.HopStatus) any { return &h.Mounted }},
	{key: "mapper_elsewhere", ref: func(h *chains.HopStatus) any { return &h.MapperElsewhere }},
	{key: "segments", optional: true, enc: func(h *chains.HopStatus) any {
		out := []segmentWire{}
		for _, s := range h.Segments {
			out = append(out, segmentWire{s.Target, s.Cipher, uint32(s.KeyBits)})
		}
		return out
	}, dec: func(h *chains.HopStatus, v dbus.Variant) error {
		var in []segmentWire
		if err := v.Store(&in); err != nil {
			return err
		}
		h.Segments = nil
		for _, s := range in {
			h.Segments = append(h.Segments, chains.Segment{Target: Clean(s.Target), Cipher: Clean(s.Cipher), KeyBits: int(s.KeyBits)})
		}
		return nil
	}},
}

// segmentWire is a layer's segment on the bus: (target, cipher, key bits).
type segmentWire struct {
	Target, Cipher string
	KeyBits        uint32
}

var statusCodec = codec[chains.Status]{
	{key: "chain", ref: func(s *chains.Status) any { return &s.Chain }},
	{key: "source_vm", ref: func(s *chains.Status) any { return &s.SourceVM }},
	{key: "source_running", ref: func(s *chains.Status) any { return &s.SourceRunning }},
	{key: "source", ref: func(s *chains.Status) any { return &s.Source }},
	{key: "missing",
		enc: func(s *chains.Status) any { return int32(s.Missing) },
		dec: func(s *chains.Status, x dbus.Variant) error {
			var n int32
			err := x.Store(&n)
			s.Missing = int(n)
			return err
		}},
	{key: "problem", ref: func(s *chains.Status) any { return &s.Problem }},
	{key: "other", ref: func(s *chains.Status) any { return &s.Other }, optional: true},
	{key: "hops",
		enc: func(s *chains.Status) any {
			hops := make([]map[string]dbus.Variant, len(s.Hops))
			for i := range s.Hops {
				hops[i] = hopStatusCodec.encode(&s.Hops[i])
			}
			return hops
		},
		dec: func(s *chains.Status, x dbus.Variant) error {
			var hops []map[string]dbus.Variant
			if err := x.Store(&hops); err != nil {
				return err
			}
			s.Hops = make([]chains.HopStatus, len(hops))
			for i, h := range hops {
				if err := hopStatusCodec.read(h, &s.Hops[i]); err != nil {
					return fmt.Errorf("hop %d: %w", i+1, err)
				}
			}
			return nil
		}},
}

var keystoreCodec = codec[chains.KeystoreState]{
	{key: "dir", ref: func(k *chains.KeystoreState) any { return &k.Dir }},
	{key: "exists", ref: func(k *chains.KeystoreState) any { return &k.Exists }},
	{key: "open", ref: func(k *chains.KeystoreState) any { return &k.Open }},
	{key: "unlocked", ref: func(k *chains.KeystoreState) any { return &k.Unlocked }},
}

// StatusToMap renders a status for the bus.
func StatusToMap(st *chains.Status) map[string]dbus.Variant { return statusCodec.encode(st) }

// StatusFromMap is the client side of StatusToMap.
func StatusFromMap(m map[string]dbus.Variant) (*chains.Status, error) {
	st := &chains.Status{}
	if err := statusCodec.read(m, st); err != nil {
		return nil, err
	}
	return st, nil
}

// discoveredWire is a discovered chain as it travels: its hops as three lists.
type discoveredWire struct {
	d                Discovered
	vms, devs, ports []string
}

var discoveredCodec = codec[discoveredWire]{
	{key: "source_vm", ref: func(w *discoveredWire) any { return &w.d.SourceVM }},
	{key: "source_port", ref: func(w *discoveredWire) any { return &w.d.SourcePort }},
	{key: "file", ref: func(w *discoveredWire) any { return &w.d.File }},
	{key: "key", ref: func(w *discoveredWire) any { return &w.d.Key }},
	{key: "read_only", ref: func(w *discoveredWire) any { return &w.d.ReadOnly }},
	{key: "hops", ref: func(w *discoveredWire) any { return &w.vms }},
	{key: "frontend_devs", ref: func(w *discoveredWire) any { return &w.devs }},
	{key: "ports", ref: func(w *discoveredWire) any { return &w.ports }},
	{key: "managed", ref: func(w *discoveredWire) any { return &w.d.ManagedBy }},
}

// DiscoveredToMap renders a discovered chain.
func DiscoveredToMap(d Discovered) map[string]dbus.Variant {
	w := discoveredWire{d: d, vms: []string{}, devs: []string{}, ports: []string{}}
	for _, h := range d.Hops {
		w.vms, w.devs, w.ports = append(w.vms, h.VM), append(w.devs, h.FrontendDev), append(w.ports, h.Port)
	}
	return discoveredCodec.encode(&w)
}

// DiscoveredFromMap is the client side of DiscoveredToMap.
func DiscoveredFromMap(m map[string]dbus.Variant) (Discovered, error) {
	var w discoveredWire
	if err := discoveredCodec.read(m, &w); err != nil {
		return Discovered{}, err
	}
	if len(w.devs) != len(w.vms) || len(w.ports) != len(w.vms) {
		return Discovered{}, fmt.Errorf("inconsistent discovered chain")
	}
	w.d.Hops = nil
	for i := range w.vms {
		w.d.Hops = append(w.d.Hops, chains.DiscoveredHop{VM: w.vms[i], FrontendDev: w.devs[i], Port: w.ports[i]})
	}
	return w.d, nil
}

var openOptionsCodec = codec[chains.OpenOptions]{
	{key: "force", ref: func(o *chains.OpenOptions) any { return &o.Force }},
	{key: "autostart", ref: func(o *chains.OpenOptions) any { return &o.Autostart }},
	{key: "break_lock", ref: func(o *chains.OpenOptions) any { return &o.BreakLock }},
}

// closeOptions are Close's options and, for CloseAll only, stop.
type closeOptions struct {
	o    chains.CloseOptions
	stop bool
}

var closeOptionsCodec = codec[closeOptions]{
	{key: "force", ref: func(c *closeOptions) any { return &c.o.Force }},
	{key: "shutdown_target", ref: func(c *closeOptions) any { return &c.o.ShutdownTarget }},
	{key: "eject", ref: func(c *closeOptions) any { return &c.o.Eject }},
	{key: "stop", ref: func(c *closeOptions) any { return &c.stop }, omitZero: true},
}

// OpenOptionsFromMap decodes Open's options.
func OpenOptionsFromMap(m map[string]dbus.Variant) (chains.OpenOptions, error) {
	var o chains.OpenOptions
	err := openOptionsCodec.accept(m, &o, "option")
	return o, err
}

// CloseOptionsFromMap decodes Close's options (stop only where allowed).
func CloseOptionsFromMap(m map[string]dbus.Variant, allowStop bool) (chains.CloseOptions, bool, error) {
	var c closeOptions
	if _, ok := m["stop"]; ok && !allowStop {
		return c.o, false, Errorf(InvalidArgs, "unknown option %q", "stop")
	}
	err := closeOptionsCodec.accept(m, &c, "option")
	return c.o, c.stop, err
}

// OpenOptionsToMap encodes open options as the a{sv} of Open and OpenAdhoc.
func OpenOptionsToMap(o chains.OpenOptions) map[string]dbus.Variant {
	return openOptionsCodec.encode(&o)
}

// CloseOptionsToMap encodes close options as the a{sv} of Close and CloseAdhoc.
func CloseOptionsToMap(o chains.CloseOptions) map[string]dbus.Variant {
	return closeOptionsCodec.encode(&closeOptions{o: o})
}

// CloseAllOptionsToMap encodes CloseAll's options.
func CloseAllOptionsToMap(o chains.CloseOptions, stop bool) map[string]dbus.Variant {
	return closeOptionsCodec.encode(&closeOptions{o: o, stop: stop})
}

// Spec is an ad-hoc chain (and, for luks-init, the container to create). dom0 files
// travel as descriptors the client opened with the caller's rights, never as paths.
type Spec struct {
	SourceVM, File, Key string
	Destinations        []string
	Inject              map[string]*os.File // qube -> dom0 key file to inject if it has none
	InjectKeystore      map[string]string   // qube -> key store directory to inject its key from if it has none
	CryptOptions        map[string]string   // qube -> cryptsetup options
	Ciphers             map[string]string   // qube -> the ciphers its layer may use (space-separated)
	MountPoint          string
	MountOptions        string // mount -o for the plaintext ("": nosuid,nodev)
	MountAnywhere       bool   // status: mounted anywhere counts (the original's --mp "")
	ReadOnly, Autostart bool
	// luks-init
	Size                         uint64
	KeySize                      uint32
	FS                           string
	KeyEntropy, ContainerEntropy *os.File            // nil: qcryptd's /dev/random, /dev/urandom
	Container                    *os.File            // a new empty file to build in; nil: qcryptd's private tmpfs
	Backups                      map[string]*os.File // qube -> new empty file for its key's backup
	Keystore                     string              // key store directory that gets the keys; "": none

	// InjectKeys is what qcryptd read from Inject (server side).
	InjectKeys map[string][]byte
}

// specCodec is a spec's plain fields; its descriptors (specFDKeys) travel apart.
var specCodec = codec[Spec]{
	{key: "source_vm", ref: func(s *Spec) any { return &s.SourceVM }},
	{key: "file", ref: func(s *Spec) any { return &s.File }},
	{key: "key", ref: func(s *Spec) any { return &s.Key }},
	{key: "destinations", ref: func(s *Spec) any { return &s.Destinations }},
	{key: "read_only", ref: func(s *Spec) any { return &s.ReadOnly }},
	{key: "autostart", ref: func(s *Spec) any { return &s.Autostart }},
	{key: "crypt_options", ref: func(s *Spec) any { return &s.CryptOptions }, omitZero: true},
	{key: "ciphers", ref: func(s *Spec) any { return &s.Ciphers }, omitZero: true},
	{key: "mount_options", ref: func(s *Spec) any { return &s.MountOptions }, omitZero: true},
	{key: "inject_keystore", ref: func(s *Spec) any { return &s.InjectKeystore }, omitZero: true},
	{key: "mount_point", ref: func(s *Spec) any { return &s.MountPoint }, omitZero: true},
	{key: "mount_anywhere", ref: func(s *Spec) any { return &s.MountAnywhere }, omitZero: true},
	{key: "size", ref: func(s *Spec) any { return &s.Size }, omitZero: true},
	{key: "key_size", ref: func(s *Spec) any { return &s.KeySize }, omitZero: true},
	{key: "fs", ref: func(s *Spec) any { return &s.FS }, omitZero: true},
	{key: "keystore", ref: func(s *Spec) any { return &s.Keystore }, omitZero: true},
}

// specFDKeys are the spec's keys whose values are descriptors (receiveFDs).
var specFDKeys = []string{"inject", "backups", "key_entropy", "container_entropy", "container_file"}

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
	m := specCodec.encode(&s)
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
// luks-init files are checked and duplicated (the connection closes what was received).
func (s *Spec) receiveFDs(m map[string]dbus.Variant) error {
	var files receivedFiles
	fd := func(v dbus.Variant, what string) (dbus.UnixFD, error) {
		x, ok := v.Value().(dbus.UnixFD)
		if !ok {
			return 0, Errorf(InvalidArgs, "%s: wrong type %s, want a file descriptor (h)", what, v.Signature())
		}
		return x, nil
	}
	fdsOf := func(key string) (map[string]dbus.UnixFD, error) {
		v, ok := m[key]
		if !ok {
			return nil, nil
		}
		inner, ok := v.Value().(map[string]dbus.Variant)
		if !ok {
			return nil, Errorf(InvalidArgs, "%s: wrong type %s, want a{sv} of file descriptors", key, v.Signature())
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
		key, err := files.readKey(x, qubes.Printable(vm, 40))
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
		f, err := files.take(x, fdNewFile, "backup for "+qubes.Printable(vm, 40))
		if err != nil {
			return err
		}
		if s.Backups == nil {
			s.Backups = map[string]*os.File{}
		}
		s.Backups[vm] = f
	}
	for _, one := range []struct {
		key  string
		f    **os.File
		kind fdKind
	}{{"key_entropy", &s.KeyEntropy, fdRead}, {"container_entropy", &s.ContainerEntropy, fdRead}, {"container_file", &s.Container, fdContainer}} {
		v, ok := m[one.key]
		if !ok {
			continue
		}
		x, err := fd(v, one.key)
		if err != nil {
			return err
		}
		if *one.f, err = files.take(x, one.kind, one.key); err != nil {
			return err
		}
	}
	return nil
}

// SpecFromMap decodes and validates a spec into a chain (and the luks-init fields).
// The spec owns the files it took; a refused spec has none.
func SpecFromMap(m map[string]dbus.Variant) (*chains.Chain, Spec, error) {
	var s Spec
	if err := knownKeys(m, "spec field", append(specCodec.keys(), specFDKeys...)...); err != nil {
		return nil, s, err
	}
	if err := s.receiveFDs(m); err != nil {
		s.Close()
		return nil, Spec{}, err
	}
	c, err := s.chain(m)
	if err != nil {
		s.Close()
		return nil, Spec{}, err
	}
	return c, s, nil
}

// chain decodes the plain fields and validates the chain they describe.
func (s *Spec) chain(m map[string]dbus.Variant) (*chains.Chain, error) {
	if err := specCodec.acceptKnown(m, s, "spec field"); err != nil {
		return nil, err
	}
	c := &chains.Chain{SourceVM: s.SourceVM, SourceFile: s.File, Key: s.Key, MountPoint: s.MountPoint, MountOptions: s.MountOptions,
		MountAnywhere: s.MountAnywhere && s.MountPoint == "", ReadOnly: s.ReadOnly, Autostart: s.Autostart, Type: "luks"}
	for _, vm := range s.Destinations {
		h := chains.Hop{VM: vm}
		if o := s.CryptOptions[vm]; o != "" {
			opts, err := chains.ParseCryptOptions(o)
			if err != nil {
				return nil, Errorf(InvalidArgs, "crypt_options of %s: %v", vm, err)
			}
			h.Options = opts
		}
		if l, ok := s.Ciphers[vm]; ok {
			list, err := chains.ParseCiphers(l)
			if err != nil {
				return nil, Errorf(InvalidArgs, "ciphers of %s: %v", qubes.Printable(vm, 40), err)
			}
			h.Ciphers = list
		}
		c.Hops = append(c.Hops, h)
	}
	for vm, dir := range s.InjectKeystore {
		if _, both := s.InjectKeys[vm]; both {
			return nil, Errorf(InvalidArgs, "inject and inject_keystore both name %s", qubes.Printable(vm, 40))
		}
		clean, err := chains.CleanKeystoreDir(dir)
		if err != nil {
			return nil, Errorf(InvalidArgs, "inject_keystore of %s: %v", qubes.Printable(vm, 40), err)
		}
		s.InjectKeystore[vm] = clean
	}
	for what, vms := range map[string][]string{"inject": keysOf(s.InjectKeys), "inject_keystore": keysOf(s.InjectKeystore),
		"backups": keysOf(s.Backups), "crypt_options": keysOf(s.CryptOptions), "ciphers": keysOf(s.Ciphers)} {
		for _, vm := range vms {
			if !c.Involves(vm) || vm == c.SourceVM {
				return nil, Errorf(InvalidArgs, "%s: %s is not a destination", what, qubes.Printable(vm, 40))
			}
		}
	}
	if err := c.Validate(); err != nil {
		return nil, Errorf(InvalidArgs, "%v", err)
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
