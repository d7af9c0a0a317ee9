package dbusapi

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"

	"github.com/godbus/dbus/v5"

	"github.com/qcrypt/qcrypt/chains"
)

// ErrQcryptdNotRunning means no qcryptd owns the bus name.
var ErrQcryptdNotRunning = errors.New("qcryptd is not running (start it with: sudo systemctl start qcryptd)")

// Client is the typed client of qcryptd on the system bus. It believes a signal only
// when it comes from the unique name that owns org.qcrypt.Qcryptd1 (anyone on the bus
// can send a signal, even straight to this connection), and a NameOwnerChanged only
// from the bus itself.
type Client struct {
	conn *dbus.Conn
	obj  dbus.BusObject
}

// Connect dials the system bus (DBUS_SYSTEM_BUS_ADDRESS if set) and checks that
// qcryptd is there.
//
// When qcryptd is not running the bus is asked to start it (D-Bus activation: the
// activation file hands it to systemd); where it cannot, the error is ErrNotRunning.
func Connect() (*Client, error) { return dial("", true) }

// ConnectAt is Connect on the bus at address: one of several private buses in one
// process (the tests').
func ConnectAt(address string) (*Client, error) { return dial(address, true) }

// ConnectRunning is Connect without starting qcryptd: for questions that must not have
// it start (and open its chains), as a completion or a check that can run offline.
func ConnectRunning() (*Client, error) { return dial("", false) }

// dial connects to the bus at address ("": the system bus).
func dial(address string, activate bool) (*Client, error) {
	c, err := connectBus(address)
	if err != nil {
		return nil, err
	}
	owner, err := c.owner()
	if err == nil && owner == "" && activate {
		var reply uint32
		if c.conn.BusObject().Call(busDriver+".StartServiceByName", 0, BusName, uint32(0)).Store(&reply) == nil {
			owner, err = c.owner()
		}
	}
	if err != nil || owner == "" {
		c.Disconnect()
		return nil, ErrQcryptdNotRunning
	}
	return c, nil
}

// ConnectBus connects to the system bus whether qcryptd runs or not: for a Watch that
// waits for it (the notification agent).
func ConnectBus() (*Client, error) { return connectBus("") }

func connectBus(address string) (*Client, error) {
	var conn *dbus.Conn
	var err error
	if address == "" {
		conn, err = dbus.ConnectSystemBus()
	} else {
		conn, err = dbus.Connect(address)
	}
	if err != nil {
		return nil, fmt.Errorf("cannot connect to the system bus: %w", err)
	}
	return &Client{conn: conn, obj: conn.Object(BusName, ManagerPath)}, nil
}

// busDriver is the bus itself, the only sender of NameOwnerChanged.
const busDriver = "org.freedesktop.DBus"

// owner is the unique name that owns qcryptd's bus name now, or "".
func (c *Client) owner() (string, error) {
	var owner string
	err := c.conn.BusObject().Call(busDriver+".GetNameOwner", 0, BusName).Store(&owner)
	var de dbus.Error
	if errors.As(err, &de) && de.Name == "org.freedesktop.DBus.Error.NameHasNoOwner" {
		return "", nil
	}
	return owner, err
}

// ownerChange decodes a NameOwnerChanged of qcryptd's name sent by the bus; ok is
// false for anything else, forged ones included.
func ownerChange(s *dbus.Signal) (newOwner string, ok bool) {
	if s.Sender != busDriver || s.Name != busDriver+".NameOwnerChanged" {
		return "", false
	}
	var name, old string
	if dbus.Store(s.Body, &name, &old, &newOwner) != nil || name != BusName {
		return "", false
	}
	return newOwner, true
}

// Disconnect closes the connection (which fails only when it is closed already).
func (c *Client) Disconnect() { _ = c.conn.Close() }

// Conn is the underlying connection (for signal subscriptions).
func (c *Client) Conn() *dbus.Conn { return c.conn }

// RemoteError is an error reply; Name is the D-Bus error name.
type RemoteError struct {
	Name, Msg string
}

func (e *RemoteError) Error() string { return e.Msg }

// IsErrorName reports whether err is qcryptd's error of that name.
func IsErrorName(err error, name ErrorName) bool {
	var re *RemoteError
	return errors.As(err, &re) && re.Name == ErrorPrefix+string(name)
}

// IsAccessDenied reports an access refusal.
func IsAccessDenied(err error) bool {
	var re *RemoteError
	return errors.As(err, &re) && re.Name == accessDenied
}

func remote(err error) error {
	var de dbus.Error
	if errors.As(err, &de) {
		msg := de.Name
		if len(de.Body) > 0 {
			if s, ok := de.Body[0].(string); ok {
				msg = s
			}
		}
		switch de.Name {
		case "org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner":
			return ErrQcryptdNotRunning
		case accessDenied:
			if !strings.HasPrefix(msg, "access denied") {
				// The bus policy refused, not qcryptd: dbus-daemon lists the rules matched,
				// dbus-broker (dom0's bus) says "Sender is not authorized to send
				// message". Say what it means.
				msg = ErrAccessDenied.Error()
			}
		}
		return &RemoteError{Name: de.Name, Msg: Clean(msg)}
	}
	return err
}

func (c *Client) call(ctx context.Context, method string, out []any, args ...any) error {
	call := c.obj.CallWithContext(ctx, ManagerInterface+"."+method, 0, args...)
	if call.Err != nil {
		return remote(call.Err)
	}
	if len(out) == 0 {
		return nil
	}
	return call.Store(out...)
}

// Chain reads a chain object's properties.
func (c *Client) Chain(ctx context.Context, name string) (ChainInfo, error) {
	var all map[string]dbus.Variant
	call := c.conn.Object(BusName, ChainPath(name)).CallWithContext(ctx, propertiesInterface+".GetAll", 0, ChainInterface)
	if call.Err != nil {
		return ChainInfo{}, remote(call.Err)
	}
	if err := call.Store(&all); err != nil {
		return ChainInfo{}, err
	}
	return ChainInfoFromProps(all)
}

// ChainInfoFromProps decodes a chain object's properties.
func ChainInfoFromProps(all map[string]dbus.Variant) (ChainInfo, error) {
	var ci ChainInfo
	err := chainInfoCodec.read(all, &ci)
	return ci, err
}

// Status returns the status of a configured chain.
func (c *Client) Status(ctx context.Context, name string) (*chains.Status, error) {
	var m map[string]dbus.Variant
	if err := c.call(ctx, "Status", []any{&m}, name); err != nil {
		return nil, err
	}
	return StatusFromMap(m)
}

// StatusAdhoc returns the status of a chain given as a spec.
func (c *Client) StatusAdhoc(ctx context.Context, spec Spec) (*chains.Status, error) {
	var m map[string]dbus.Variant
	if err := c.call(ctx, "StatusAdhoc", []any{&m}, spec.ToMap()); err != nil {
		return nil, err
	}
	return StatusFromMap(m)
}

// Discover lists every chain open on the system.
func (c *Client) Discover(ctx context.Context) ([]Discovered, error) {
	var ms []map[string]dbus.Variant
	if err := c.call(ctx, "Discover", []any{&ms}); err != nil {
		return nil, err
	}
	var out []Discovered
	for _, m := range ms {
		d, err := DiscoveredFromMap(m)
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, nil
}

// PlanStep is one step of a plan.
type PlanStep struct{ VM, Desc string }

// Plan returns the steps of an open or close of a chain (name) or spec.
func (c *Client) Plan(ctx context.Context, op, name string, spec *Spec, options map[string]dbus.Variant) ([]PlanStep, error) {
	m := map[string]dbus.Variant{}
	if spec != nil {
		m = spec.ToMap()
	}
	if options == nil {
		options = map[string]dbus.Variant{}
	}
	var out []PlanStep
	err := c.call(ctx, "Plan", []any{&out}, op, name, m, options)
	cleanValue(reflect.ValueOf(out))
	return out, err
}

// Reload re-reads the daemon's config target.
func (c *Client) Reload(ctx context.Context) (int, error) {
	var n uint32
	err := c.call(ctx, "Reload", []any{&n})
	return int(n), err
}

// Check validates a config target.
func (c *Client) Check(ctx context.Context, target string) (bool, []string, error) {
	var ok bool
	var errs []string
	err := c.call(ctx, "Check", []any{&ok, &errs}, target)
	cleanValue(reflect.ValueOf(errs))
	return ok, errs, err
}

// JobResult is how a job ended.
type JobResult struct {
	Success bool
	Message string
}

// Starter starts a job and returns its path.
type Starter func(ctx context.Context) (dbus.ObjectPath, error)

// Open returns the Starter of an open of a configured chain, for RunJob.
func (c *Client) Open(name string, o chains.OpenOptions) Starter {
	return c.starter("Open", name, OpenOptionsToMap(o))
}

// Close returns the Starter of a close of a configured chain.
func (c *Client) Close(name string, o chains.CloseOptions) Starter {
	return c.starter("Close", name, CloseOptionsToMap(o))
}

// OpenAdhoc returns the Starter of an open of an ad-hoc chain.
func (c *Client) OpenAdhoc(spec Spec, o chains.OpenOptions) Starter {
	return c.starter("OpenAdhoc", spec.ToMap(), OpenOptionsToMap(o))
}

// CloseAdhoc returns the Starter of a close of an ad-hoc chain.
func (c *Client) CloseAdhoc(spec Spec, o chains.CloseOptions) Starter {
	return c.starter("CloseAdhoc", spec.ToMap(), CloseOptionsToMap(o))
}

// LuksInit returns the Starter of a luks-init.
func (c *Client) LuksInit(spec Spec) Starter { return c.starter("LuksInit", spec.ToMap()) }

func (c *Client) starter(method string, args ...any) Starter {
	return func(ctx context.Context) (dbus.ObjectPath, error) {
		var p dbus.ObjectPath
		return p, c.call(ctx, method, []any{&p}, args...)
	}
}

// KeystoreUnlock returns the Starter of a key store unlock (dir "" is the default store);
// the job asks for the password through systemd's password agents.
func (c *Client) KeystoreUnlock(dir string) Starter { return c.starter("KeystoreUnlock", dir) }

// KeystoreLock returns the Starter of a key store lock.
func (c *Client) KeystoreLock(dir string) Starter { return c.starter("KeystoreLock", dir) }

// KeystoreInit returns the Starter of a key store's creation; the job asks for the new
// password through systemd's password agents.
func (c *Client) KeystoreInit(dir string) Starter { return c.starter("KeystoreInit", dir) }

// KeystoreStatus reads a key store's state.
func (c *Client) KeystoreStatus(ctx context.Context, dir string) (chains.KeystoreState, error) {
	var m map[string]dbus.Variant
	var st chains.KeystoreState
	if err := c.call(ctx, "KeystoreStatus", []any{&m}, dir); err != nil {
		return st, err
	}
	err := keystoreCodec.read(m, &st)
	return st, err
}

// CloseAll closes every open chain; with stop, the daemon exits afterwards. Pass it to
// RunJobs to wait for the closes.
func (c *Client) CloseAll(o chains.CloseOptions, stop bool) func(context.Context) ([]dbus.ObjectPath, error) {
	m := CloseOptionsToMap(o)
	m["stop"] = dbus.MakeVariant(stop)
	return func(ctx context.Context) ([]dbus.ObjectPath, error) {
		var out []dbus.ObjectPath
		return out, c.call(ctx, "CloseAll", []any{&out}, m)
	}
}

// CancelJob asks the daemon to cancel a job between steps.
func (c *Client) CancelJob(ctx context.Context, job dbus.ObjectPath) error {
	call := c.conn.Object(BusName, job).CallWithContext(ctx, JobInterface+".Cancel", 0)
	return remote(call.Err)
}

// Job reads a job's properties.
func (c *Client) Job(ctx context.Context, job dbus.ObjectPath) (JobInfo, error) {
	var all map[string]dbus.Variant
	call := c.conn.Object(BusName, job).CallWithContext(ctx, propertiesInterface+".GetAll", 0, JobInterface)
	if call.Err != nil {
		return JobInfo{}, remote(call.Err)
	}
	if err := call.Store(&all); err != nil {
		return JobInfo{}, err
	}
	return jobFromProps(job, all)
}

func jobFromProps(path dbus.ObjectPath, all map[string]dbus.Variant) (JobInfo, error) {
	var j JobInfo
	id, ok := strings.CutPrefix(string(path), jobPathPrefix)
	if !ok {
		return j, fmt.Errorf("cannot read job %s: not a job path", path)
	}
	var err error
	if j.ID, err = strconv.ParseUint(id, 10, 64); err != nil {
		return j, fmt.Errorf("cannot read job %s: %w", path, err)
	}
	err = jobInfoCodec.read(all, &j)
	return j, err
}

// managedObjects reads every chain and job object, with their properties, at once.
func (c *Client) managedObjects(ctx context.Context) (map[dbus.ObjectPath]map[string]map[string]dbus.Variant, error) {
	var objs map[dbus.ObjectPath]map[string]map[string]dbus.Variant
	call := c.conn.Object(BusName, ManagerPath).CallWithContext(ctx, objectManagerInterface+".GetManagedObjects", 0)
	if call.Err != nil {
		return nil, remote(call.Err)
	}
	return objs, call.Store(&objs)
}

// Chains reads every chain qcryptd knows, sorted by name, in one call.
func (c *Client) Chains(ctx context.Context) ([]ChainInfo, error) {
	objs, err := c.managedObjects(ctx)
	if err != nil {
		return nil, err
	}
	var out []ChainInfo
	for path, ifaces := range objs {
		if props, ok := ifaces[ChainInterface]; ok {
			ci, err := ChainInfoFromProps(props)
			if err != nil {
				return nil, fmt.Errorf("cannot read chain %s: %w", path, err)
			}
			out = append(out, ci)
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Name < out[b].Name })
	return out, nil
}

// Jobs lists the jobs qcryptd shows (running, queued, and finished ones for a minute),
// in the order they were started.
func (c *Client) Jobs(ctx context.Context) ([]JobInfo, error) {
	objs, err := c.managedObjects(ctx)
	if err != nil {
		return nil, err
	}
	var out []JobInfo
	for path, ifaces := range objs {
		if props, ok := ifaces[JobInterface]; ok {
			j, err := jobFromProps(path, props)
			if err != nil {
				return nil, err
			}
			out = append(out, j)
		}
	}
	sort.Slice(out, func(a, b int) bool { return out[a].ID < out[b].ID })
	return out, nil
}

// RunJob starts a job and waits for it, passing progress to progress (may be nil).
// When ctx ends first, the job is canceled and still waited for, so the result is the
// job's real outcome.
func (c *Client) RunJob(ctx context.Context, start Starter, progress func(JobInfo)) (JobResult, error) {
	results, err := c.RunJobs(ctx, func(ctx context.Context) ([]dbus.ObjectPath, error) {
		p, err := start(ctx)
		return []dbus.ObjectPath{p}, err
	}, progress)
	if err != nil {
		return JobResult{}, err
	}
	return results[0], nil
}

// RunJobs is RunJob for a call that starts several jobs (CloseAll); results are in the
// order of the paths. Subscribing before the call means no job can end unseen.
func (c *Client) RunJobs(ctx context.Context, start func(context.Context) ([]dbus.ObjectPath, error), progress func(JobInfo)) ([]JobResult, error) {
	rules := []dbus.MatchOption{dbus.WithMatchSender(BusName), dbus.WithMatchPathNamespace("/org/qcrypt/Qcryptd1/job")}
	if err := c.conn.AddMatchSignal(rules...); err != nil {
		return nil, fmt.Errorf("cannot subscribe to job signals: %w", err)
	}
	defer c.conn.RemoveMatchSignal(rules...)
	// qcryptd going away (stopped, crashed) ends the wait too.
	gone := ownerRule()
	if err := c.conn.AddMatchSignal(gone...); err != nil {
		return nil, fmt.Errorf("cannot subscribe to name changes: %w", err)
	}
	defer c.conn.RemoveMatchSignal(gone...)
	sigs := make(chan *dbus.Signal, 256)
	c.conn.Signal(sigs)
	defer c.conn.RemoveSignal(sigs)
	// The jobs belong to the qcryptd that owns the name now; after the subscription, so
	// a change of owner from here on is seen.
	owner, err := c.owner()
	if err != nil || owner == "" {
		return nil, ErrQcryptdNotRunning
	}

	paths, err := start(context.Background())
	if err != nil {
		return nil, err
	}
	results := make([]JobResult, len(paths))
	pending := map[dbus.ObjectPath]int{}
	for i, p := range paths {
		pending[p] = i
	}
	finish := func(p dbus.ObjectPath, r JobResult) {
		if i, ok := pending[p]; ok {
			results[i] = r
			delete(pending, p)
		}
	}
	// A job may have ended before anything was seen: read the state of each. From then
	// on its changes come with their values: each step is seen, without a round trip.
	latest := map[dbus.ObjectPath]JobInfo{}
	for _, p := range paths {
		j, err := c.Job(context.Background(), p)
		if err != nil {
			continue // gone already: its Completed signal is queued
		}
		latest[p] = j
		if progress != nil {
			progress(j)
		}
		if j.State.Ended() {
			finish(p, JobResult{Success: j.State == JobDone, Message: j.Message})
		}
	}
	canceled := false
	for len(pending) > 0 {
		select {
		case <-ctx.Done():
			if !canceled {
				canceled = true
				for p := range pending {
					_ = c.CancelJob(context.Background(), p) // a job that ended meanwhile is fine
				}
			}
			ctx = context.Background()
		case s, ok := <-sigs:
			if !ok {
				return results, errors.New("the connection to the system bus closed")
			}
			if newOwner, ok := ownerChange(s); ok {
				if newOwner != owner {
					return results, errors.New("qcryptd stopped before the end of its jobs was seen")
				}
				continue
			}
			if s.Sender != owner {
				continue // forged: not from qcryptd
			}
			switch s.Name {
			case JobInterface + ".Completed":
				var r JobResult
				if dbus.Store(s.Body, &r.Success, &r.Message) == nil {
					r.Message = Clean(r.Message)
					finish(s.Path, r)
				}
			case propertiesInterface + ".PropertiesChanged":
				j, mine := latest[s.Path]
				var iface string
				var changed map[string]dbus.Variant
				if !mine || progress == nil || len(s.Body) < 2 || dbus.Store(s.Body[:2], &iface, &changed) != nil || iface != JobInterface {
					continue
				}
				if jobInfoCodec.update(changed, &j) == nil {
					latest[s.Path] = j
					progress(j)
				}
			}
		}
	}
	return results, nil
}

// ChainEvent is a state change of a chain.
type ChainEvent struct {
	Chain           string
	State, Previous ChainState
	Reason          Reason
}

// ownerRule subscribes to changes of qcryptd's name owner, from the bus only.
func ownerRule() []dbus.MatchOption {
	return []dbus.MatchOption{dbus.WithMatchSender(busDriver), dbus.WithMatchInterface(busDriver),
		dbus.WithMatchMember("NameOwnerChanged"), dbus.WithMatchArg(0, BusName)}
}

// Watcher receives what Watch sees; a nil field is not called.
type Watcher struct {
	Change     func(ChainEvent)
	Presence   func(running bool) // qcryptd left or came back
	Subscribed func()             // from now on no change is missed
}

// Watch reports every chain state change until ctx ends, following qcryptd across
// restarts.
func (c *Client) Watch(ctx context.Context, w Watcher) error {
	rules := []dbus.MatchOption{dbus.WithMatchSender(BusName), dbus.WithMatchInterface(ChainInterface), dbus.WithMatchMember("StateChanged")}
	if err := c.conn.AddMatchSignal(rules...); err != nil {
		return fmt.Errorf("cannot subscribe to chain changes: %w", err)
	}
	defer c.conn.RemoveMatchSignal(rules...)
	if err := c.conn.AddMatchSignal(ownerRule()...); err != nil {
		return fmt.Errorf("cannot subscribe to name changes: %w", err)
	}
	defer c.conn.RemoveMatchSignal(ownerRule()...)
	sigs := make(chan *dbus.Signal, 64)
	c.conn.Signal(sigs)
	defer c.conn.RemoveSignal(sigs)
	owner, err := c.owner()
	if err != nil {
		return fmt.Errorf("cannot find qcryptd on the bus: %w", err)
	}
	if w.Subscribed != nil {
		w.Subscribed()
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case s, ok := <-sigs:
			if !ok {
				return errors.New("the connection to the system bus closed")
			}
			if newOwner, ok := ownerChange(s); ok {
				if (newOwner != "") != (owner != "") && w.Presence != nil {
					w.Presence(newOwner != "")
				}
				owner = newOwner
				continue
			}
			if owner == "" || s.Sender != owner || s.Name != ChainInterface+".StateChanged" {
				continue // forged, or not a chain change
			}
			var ev ChainEvent
			if dbus.Store(s.Body, &ev.State, &ev.Previous, &ev.Reason.Cause, &ev.Reason.Text) != nil {
				continue
			}
			ev.Chain = chainNameOf(s.Path)
			if w.Change != nil {
				w.Change(ev.clean())
			}
		}
	}
}

func (ev ChainEvent) clean() ChainEvent {
	return ChainEvent{Chain: Clean(ev.Chain), State: ChainState(Clean(string(ev.State))), Previous: ChainState(Clean(string(ev.Previous))),
		Reason: Because(Cause(Clean(string(ev.Reason.Cause))), Clean(ev.Reason.Text))}
}

// chainNameOf reverses ChainPath.
func chainNameOf(p dbus.ObjectPath) string {
	s := string(p)
	if len(s) <= len(chainPathPrefix) {
		return ""
	}
	return unescape(s[len(chainPathPrefix):])
}

func unescape(s string) string {
	var out []byte
	for i := 0; i < len(s); i++ {
		if s[i] == '_' && i+2 < len(s) {
			var b byte
			if _, err := fmt.Sscanf(s[i+1:i+3], "%02x", &b); err == nil {
				out = append(out, b)
				i += 2
				continue
			}
		}
		out = append(out, s[i])
	}
	return string(out)
}
