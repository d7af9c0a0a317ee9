package daemon

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
)

// The dbusapi.Backend methods: each runs its state work in the loop.

var _ dbusapi.Backend = (*Daemon)(nil)

func noChain(name string) error {
	return dbusapi.Errorf(dbusapi.NoSuchChain, "no chain %s", chains.Quote(name))
}

func (d *Daemon) refuseWhenStopping() error {
	if d.shuttingDown {
		return dbusapi.Errorf(dbusapi.ShuttingDown, "the system is shutting down: qcryptd closes every chain")
	}
	if d.stopping {
		return dbusapi.Errorf(dbusapi.ShuttingDown, "qcryptd is stopping")
	}
	return nil
}

// ListChains lists the chains.
func (d *Daemon) ListChains() []dbusapi.ChainInfo {
	var out []dbusapi.ChainInfo
	d.do(func() {
		for _, name := range d.sortedNames() {
			out = append(out, d.info(d.chains[name]))
		}
	})
	return out
}

// request queues a job on a chain found (or added) by find, in the loop.
func (d *Daemon) request(op dbusapi.JobOperation, uid uint32, find func() (*chainState, error), set func(*job)) (uint64, error) {
	var id uint64
	var err error
	ran := d.do(func() {
		if err = d.refuseWhenStopping(); err != nil {
			return
		}
		var cs *chainState
		if cs, err = find(); err != nil {
			return
		}
		j := d.newJob(op, cs, uid, false, dbusapi.Because(dbusapi.CauseRequested, "requested"))
		set(j)
		d.enqueue(j)
		id = j.id
	})
	if !ran {
		return 0, errStopped
	}
	return id, err
}

// errStopped answers what comes after the loop ended.
var errStopped = dbusapi.Errorf(dbusapi.ShuttingDown, "qcryptd has stopped")

func (d *Daemon) known(name string) func() (*chainState, error) {
	return func() (*chainState, error) {
		if cs, ok := d.chains[name]; ok {
			return cs, nil
		}
		return nil, noChain(name)
	}
}

// Open queues an open of a known chain.
func (d *Daemon) Open(uid uint32, name string, o chains.OpenOptions) (uint64, error) {
	return d.request(dbusapi.OpOpen, uid, func() (*chainState, error) {
		cs, err := d.known(name)()
		if err != nil {
			return nil, err
		}
		if err := d.refuseHeldMapper(cs.c); err != nil {
			return nil, err
		}
		return cs, nil
	}, func(j *job) { j.openOpts = o })
}

// refuseHeldMapper refuses an open while another chain holds the same mapper in one of
// the chain's qubes: chains may share a mapper name, never at the same time.
func (d *Daemon) refuseHeldMapper(c *chains.Chain) error {
	if other := d.mapperHeldBy(c); other != "" {
		return dbusapi.Errorf(dbusapi.Failed, "cannot open %s while %s is not closed", c.Name, other)
	}
	return nil
}

// mapperHeldBy names another chain that holds c's mapper (open, or being opened or
// closed) in a qube where c decrypts, or "".
func (d *Daemon) mapperHeldBy(c *chains.Chain) string {
	for _, name := range d.sortedNames() {
		other := d.chains[name]
		holds := other.state == dbusapi.ChainOpen || other.state == dbusapi.ChainOpening || other.state == dbusapi.ChainClosing || other.state == dbusapi.ChainDegraded ||
			other.running != nil && (other.running.op == dbusapi.OpOpen || other.running.op == dbusapi.OpClose)
		if vm := sharedMapper(c, other.c); name != c.Name && holds && vm != "" {
			return fmt.Sprintf("chain %s (it has mapper %s in %s)", name, c.Key, vm)
		}
	}
	return ""
}

// sharedMapper is a qube where both chains decrypt into the same mapper name, or "".
func sharedMapper(a, b *chains.Chain) string {
	if a.Key != b.Key {
		return ""
	}
	for _, h := range b.Hops {
		if slices.ContainsFunc(a.Hops, func(x chains.Hop) bool { return x.VM == h.VM }) {
			return h.VM
		}
	}
	return ""
}

// Close queues a close of a known chain.
func (d *Daemon) Close(uid uint32, name string, o chains.CloseOptions) (uint64, error) {
	return d.request(dbusapi.OpClose, uid, d.known(name), func(j *job) { j.closeOpts = o })
}

func (d *Daemon) chain(name string) (*chains.Chain, error) {
	var c *chains.Chain
	d.do(func() {
		if cs, ok := d.chains[name]; ok {
			c = cs.c
		}
	})
	if c == nil {
		return nil, noChain(name)
	}
	return c, nil
}

// Status inspects a known chain (outside the loop: it only reads qubes).
func (d *Daemon) Status(ctx context.Context, name string) (*chains.Status, error) {
	c, err := d.chain(name)
	if err != nil {
		return nil, err
	}
	return d.engine.Status(ctx, c)
}

// StatusAdhoc inspects a chain given as a spec.
func (d *Daemon) StatusAdhoc(ctx context.Context, c *chains.Chain) (*chains.Status, error) {
	return d.engine.Status(ctx, c)
}

// Discover finds the open chains of the system and names the configured ones.
func (d *Daemon) Discover(ctx context.Context) ([]dbusapi.Discovered, error) {
	found, err := d.engine.Discover(ctx)
	if err != nil {
		return nil, err
	}
	var known []*chains.Chain
	d.do(func() {
		for _, name := range d.sortedNames() {
			known = append(known, d.chains[name].c)
		}
	})
	out := make([]dbusapi.Discovered, len(found))
	for i, f := range found {
		out[i].Discovered = f
		for _, c := range known {
			if f.Matches(c) {
				out[i].ManagedBy = c.Name
				break
			}
		}
	}
	return out, nil
}

// adhoc finds or adds the state of an ad-hoc chain. Its identity is its whole spec
// (source qube, container, key, every destination): a request whose spec differs from
// a live entry of the same name is refused; a closed or failed entry is replaced.
func (d *Daemon) adhoc(c *chains.Chain) (*chainState, error) {
	if cs, ok := d.chains[c.Name]; ok {
		if cs.managed {
			return nil, dbusapi.Errorf(dbusapi.InvalidArgs, "a configured chain is named %s", chains.Quote(c.Name))
		}
		if !sameSpec(cs.c, c) {
			if cs.running != nil || cs.state == dbusapi.ChainOpen || cs.state == dbusapi.ChainDegraded {
				return nil, dbusapi.Errorf(dbusapi.InvalidArgs, "ad-hoc chain %s is %s as %s, not %s: give the spec it was opened with",
					c.Name, cs.state, specString(cs.c), specString(c))
			}
			cs.c = c
		}
		return cs, nil
	}
	cs := &chainState{c: c, state: dbusapi.ChainClosed}
	d.chains[c.Name] = cs
	d.pub.ChainAdded(d.info(cs))
	return cs, nil
}

// sameSpec compares what identifies an ad-hoc chain.
func sameSpec(a, b *chains.Chain) bool {
	return a.SourceVM == b.SourceVM && a.Container() == b.Container() && a.Key == b.Key && slices.Equal(a.VMs(), b.VMs())
}

// specString is a spec as the user gives it.
func specString(c *chains.Chain) string {
	return strings.Join(append([]string{c.SourceVM, c.Container(), c.Key}, c.VMs()[1:]...), " ")
}

// OpenAdhoc opens a chain given as a spec; it exists on the bus while it is open.
func (d *Daemon) OpenAdhoc(uid uint32, c *chains.Chain, o chains.OpenOptions) (uint64, error) {
	for vm, dir := range o.InjectStores {
		clean, err := d.keystoreDir(uid, dir)
		if err != nil {
			return 0, err
		}
		o.InjectStores[vm] = clean
	}
	return d.request(dbusapi.OpOpen, uid, func() (*chainState, error) {
		// Refused before adhoc: a refused open must not leave an entry behind.
		if err := d.refuseHeldMapper(c); err != nil {
			return nil, err
		}
		return d.adhoc(c)
	}, func(j *job) { j.openOpts = o })
}

// CloseAdhoc closes a chain given as a spec (known or not: it converges either way).
func (d *Daemon) CloseAdhoc(uid uint32, c *chains.Chain, o chains.CloseOptions) (uint64, error) {
	return d.request(dbusapi.OpClose, uid, func() (*chainState, error) { return d.adhoc(c) }, func(j *job) { j.closeOpts = o })
}

// Plan lists the steps of an open or close.
func (d *Daemon) Plan(op dbusapi.JobOperation, name string, c *chains.Chain, oo chains.OpenOptions, co chains.CloseOptions) (chains.Plan, error) {
	if c == nil {
		var err error
		if c, err = d.chain(name); err != nil {
			return nil, err
		}
	}
	if op == dbusapi.OpOpen {
		return chains.PlanOpen(c, oo), nil
	}
	return chains.PlanClose(c, co), nil
}

// LuksInit queues the creation of a container; release closes the caller's files once
// the job has ended.
func (d *Daemon) LuksInit(uid uint32, spec chains.InitSpec, release func()) (uint64, error) {
	if d.o.Dom0 == nil {
		return 0, dbusapi.Errorf(dbusapi.Failed, "luks-init is not available: no dom0 runner")
	}
	if err := spec.Validate(); err != nil {
		return 0, dbusapi.Errorf(dbusapi.InvalidArgs, "cannot create the container: %v", err)
	}
	if spec.Keystore != nil {
		dir, err := d.keystoreDir(uid, spec.Keystore.Dir)
		if err != nil {
			return 0, err
		}
		spec.Keystore = &chains.Keystore{Dir: dir}
	}
	return d.request(dbusapi.OpLuksInit, uid, func() (*chainState, error) { return nil, nil }, func(j *job) { j.spec, j.release = spec, release })
}

// keystoreDir resolves a caller's key store argument: "" is the default store. Any
// other directory is a dom0 path the caller names, in which qcryptd (root) would open,
// create and write files: only root may name one, others only the stores that root's
// chain files name.
func (d *Daemon) keystoreDir(uid uint32, dir string) (string, error) {
	clean := chains.DefaultKeystoreDir
	if dir != "" {
		var err error
		if clean, err = chains.CleanKeystoreDir(dir); err != nil {
			return "", dbusapi.Errorf(dbusapi.InvalidArgs, "%v", err)
		}
	}
	if uid == 0 || clean == chains.DefaultKeystoreDir {
		return clean, nil
	}
	named := false
	d.do(func() {
		for _, cs := range d.chains {
			named = named || cs.managed && slices.Contains(cs.c.KeystoreDirs(), clean)
		}
	})
	if !named {
		return "", fmt.Errorf("%w: only root may name a key store that no chain file names (%s)", dbusapi.ErrAccessDenied, clean)
	}
	return clean, nil
}

// KeystoreUnlock queues an unlock of a key store; its job asks for the password.
func (d *Daemon) KeystoreUnlock(uid uint32, dir string) (uint64, error) {
	return d.keystoreJob(dbusapi.OpKeystoreUnlock, uid, dir)
}

// KeystoreLock queues a lock of a key store.
func (d *Daemon) KeystoreLock(uid uint32, dir string) (uint64, error) {
	return d.keystoreJob(dbusapi.OpKeystoreLock, uid, dir)
}

// KeystoreInit queues the creation of a key store; its job asks for the new password.
func (d *Daemon) KeystoreInit(uid uint32, dir string) (uint64, error) {
	return d.keystoreJob(dbusapi.OpKeystoreInit, uid, dir)
}

func (d *Daemon) keystoreJob(op dbusapi.JobOperation, uid uint32, dir string) (uint64, error) {
	store, err := d.keystoreDir(uid, dir)
	if err != nil {
		return 0, err
	}
	return d.request(op, uid, func() (*chainState, error) { return nil, nil }, func(j *job) { j.keystore = store })
}

// KeystoreStatus reads a key store's state in dom0.
func (d *Daemon) KeystoreStatus(ctx context.Context, uid uint32, dir string) (chains.KeystoreState, error) {
	store, err := d.keystoreDir(uid, dir)
	if err != nil {
		return chains.KeystoreState{}, err
	}
	return d.engine.KeystoreStatus(ctx, chains.Keystore{Dir: store})
}

// Reload re-reads the config target: unchanged chains are left alone, removed or
// changed ones are closed (if open) and dropped, new ones added and evaluated. A
// target with errors changes nothing.
func (d *Daemon) Reload() (int, error) {
	dir, err := chains.TargetDir(d.o.Target, d.o.ConfigRoot)
	if err != nil {
		return 0, dbusapi.Errorf(dbusapi.InvalidConfig, "%v", err)
	}
	loaded, err := chains.LoadTarget(dir, d.o.AsRoot)
	if err != nil {
		return 0, dbusapi.Errorf(dbusapi.InvalidConfig, "%v", err)
	}
	d.do(func() {
		fresh := map[string]*chains.Chain{}
		for _, c := range loaded {
			fresh[c.Name] = c
		}
		for _, name := range d.sortedNames() {
			cs := d.chains[name]
			if !cs.managed {
				continue
			}
			if c, ok := fresh[name]; ok && c.Equal(cs.c) {
				delete(fresh, name)
				continue
			}
			d.retire(cs)
		}
		for _, c := range loaded {
			if _, ok := fresh[c.Name]; !ok {
				continue
			}
			if old, exists := d.chains[c.Name]; exists {
				// Changed: the old one is closing; the new one follows when it is gone.
				old.pending = nil
				d.afterRemoval(old, func() { d.addChain(c) })
				continue
			}
			d.addChain(c)
		}
		d.log.WithField("chains", len(loaded)).Info("configuration reloaded")
	})
	return len(loaded), nil
}

// retire closes a chain that left the configuration and removes it once closed.
func (d *Daemon) retire(cs *chainState) {
	cs.removed = true
	if cs.running == nil && !d.isOpenish(cs) {
		d.removeChain(cs)
		return
	}
	if !wanted(cs, dbusapi.OpClose) {
		d.enqueue(d.newJob(dbusapi.OpClose, cs, 0, true, dbusapi.Because(dbusapi.CauseConfig, "removed from the configuration")))
	}
}

// afterRemoval runs f once cs has been removed.
func (d *Daemon) afterRemoval(cs *chainState, f func()) {
	if _, ok := d.chains[cs.c.Name]; !ok || d.chains[cs.c.Name] != cs {
		f()
		return
	}
	j := cs.running
	if cs.pending != nil {
		j = cs.pending
	}
	if j == nil {
		f()
		return
	}
	j.done = append(j.done, func(bool) {
		d.post(func() {
			if cur, ok := d.chains[cs.c.Name]; ok && cur == cs {
				d.removeChain(cs)
			}
			f()
		})
	})
}

func (d *Daemon) addChain(c *chains.Chain) {
	cs := &chainState{c: c, managed: true, state: dbusapi.ChainClosed}
	d.chains[c.Name] = cs
	// A new or changed chain file is a new chain: a close of the old one does not hold it.
	d.journalUserClosed(cs, false)
	d.pub.ChainAdded(d.info(cs))
	d.updateSummary()
	if d.connected {
		d.enqueue(d.newJob(dbusapi.OpReconcile, cs, 0, true, dbusapi.Because(dbusapi.CauseConfig, "added by a reload")))
	}
}

// Check validates a config target without changing anything.
func (d *Daemon) Check(target string) (bool, []string) {
	if target == "" {
		target = d.o.Target
	}
	errs := chains.CheckTarget(target, d.o.ConfigRoot, d.o.AsRoot)
	return len(errs) == 0, errs
}

// CloseAll closes every chain that is not closed; with stop, qcryptd exits when done.
func (d *Daemon) CloseAll(uid uint32, o chains.CloseOptions, stop bool) ([]uint64, error) {
	var ids []uint64
	var err error
	if !d.do(func() {
		if err = d.refuseWhenStopping(); err == nil {
			ids = d.closeAll(uid, o, stop, dbusapi.Because(dbusapi.CauseRequested, "close all"))
		}
	}) {
		return nil, errStopped
	}
	return ids, err
}

// SystemShutdown closes every chain that is not closed, each in order (target first),
// and then stops the daemon: the system is going down, and after qcryptd qubes-core
// stops every qube at once, with no regard for chains. A running open is canceled (its
// rollback undoes it); nothing opens from here, by an event or a request.
func (d *Daemon) SystemShutdown() {
	d.do(func() {
		if d.shuttingDown || d.stopping {
			return
		}
		d.shuttingDown = true
		for _, j := range d.jobs {
			if j.op == dbusapi.OpOpen && j.cancel != nil {
				j.cancel()
			}
		}
		d.closeAll(0, chains.CloseOptions{}, true, dbusapi.Because(dbusapi.CauseSystemShutdown, "the system is shutting down"))
	})
}

// closeAll queues a close of every chain that is not closed and, with stop, stops the
// daemon once they have ended. In the loop.
func (d *Daemon) closeAll(uid uint32, o chains.CloseOptions, stop bool, why dbusapi.Reason) []uint64 {
	var ids []uint64
	var jobs []*job
	for _, name := range d.sortedNames() {
		cs := d.chains[name]
		if cs.state == dbusapi.ChainClosed && cs.running == nil {
			continue
		}
		j := d.newJob(dbusapi.OpClose, cs, uid, false, why)
		j.closeOpts = o
		d.enqueue(j)
		jobs = append(jobs, j)
		ids = append(ids, j.id)
	}
	if !stop || d.stopQueued {
		return ids
	}
	d.stopQueued = true
	left := len(jobs)
	if left == 0 {
		close(d.stop)
		return ids
	}
	for _, j := range jobs {
		j.done = append(j.done, func(bool) {
			if left--; left == 0 {
				close(d.stop)
			}
		})
	}
	return ids
}

// CancelJob cancels a job: a queued one at once, a running one between steps.
func (d *Daemon) CancelJob(uid uint32, id uint64) error {
	var err error
	d.do(func() {
		j, ok := d.jobs[id]
		if !ok {
			err = dbusapi.Errorf(dbusapi.NoSuchJob, "no job %d", id)
			return
		}
		switch j.state {
		case dbusapi.JobQueued:
			d.finish(j, context.Canceled, false)
		case dbusapi.JobRunning:
			j.canceled = true
			j.cancel()
		}
	})
	return err
}

// Info is the manager's properties.
func (d *Daemon) Info() (version, target, summary string) {
	return d.o.Version, d.o.Target, d.summary
}
