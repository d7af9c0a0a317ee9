package daemon

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/systemd"
)

func (j *job) info() dbusapi.JobInfo {
	name := ""
	if j.chain != nil {
		name = j.chain.c.Name
	}
	return dbusapi.JobInfo{ID: j.id, Operation: j.op, Chain: name, State: j.state, Step: uint32(j.step), Steps: uint32(j.steps),
		StepDescription: j.desc, Bytes: j.bytes, TotalBytes: j.total, Message: j.message, UID: j.uid}
}

func (d *Daemon) newJob(op dbusapi.JobOperation, cs *chainState, uid uint32, auto bool, reason dbusapi.Reason) *job {
	d.nextJob++
	j := &job{id: d.nextJob, op: op, chain: cs, uid: uid, auto: auto, reason: reason, state: dbusapi.JobQueued}
	d.jobs[j.id] = j
	d.pub.JobAdded(j.info())
	return j
}

// enqueue runs j now if its chain is idle; otherwise it becomes the chain's pending job,
// superseding an earlier pending one (a storm of requests ends in the last one's state).
func (d *Daemon) enqueue(j *job) {
	cs := j.chain
	if cs == nil || cs.running == nil {
		d.start(j)
		return
	}
	if cs.pending != nil {
		old := cs.pending
		d.finish(old, fmt.Errorf("%w (job %d)", errSuperseded, j.id), false)
	}
	cs.pending = j
}

// wanted reports whether an automatic operation op is already running or pending.
func wanted(cs *chainState, op dbusapi.JobOperation) bool {
	return cs.running != nil && cs.running.op == op && cs.pending == nil || cs.pending != nil && cs.pending.op == op
}

func (d *Daemon) start(j *job) {
	if d.stopping {
		// Nothing new starts while shutdown waits for the running jobs.
		d.finish(j, dbusapi.Errorf(dbusapi.ShuttingDown, "qcryptd is stopping"), false)
		return
	}
	cs := j.chain
	if cs != nil {
		cs.running = j
		j.held, j.breaks = cs.held, cs.breaks
	}
	ctx, cancel := context.WithCancel(context.Background())
	j.cancel = cancel
	j.state = dbusapi.JobRunning
	d.jobChanged(j)
	if cs != nil {
		switch {
		case j.op == dbusapi.OpOpen && cs.state != dbusapi.ChainOpen: // an open of an open chain changes nothing
			d.setState(cs, dbusapi.ChainOpening, "", j.reason)
			if cs.managed {
				d.journalUserClosed(cs, false)
			}
		case j.op == dbusapi.OpClose:
			d.setState(cs, dbusapi.ChainClosing, "", j.reason)
			if cs.managed && !j.auto {
				// Recorded before the close: a close cut short (qcryptd killed) is finished
				// at the restart and the chain stays closed, as the user asked.
				d.journalUserClosed(cs, true)
			}
		}
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		defer cancel()
		res, err := d.execute(ctx, j)
		d.post(func() { d.completed(j, res, err) })
	}()
}

// outcome says what a finished job means for its chain.
type outcome struct {
	state            dbusapi.ChainState
	waiting, message string
	cause            dbusapi.Cause // why the state changed when the job ended well; "": done
	attempt          bool          // a failed automatic open: counts for the startup interval
	userClosed       bool          // reconcile: the user closed the chain last; no automatic open before a trigger
}

// jobRun is one job at work, in its own goroutine: it must not touch daemon state
// (it posts to the loop instead). Each operation is one method.
type jobRun struct {
	d   *Daemon
	j   *job
	c   *chains.Chain // nil for luks-init
	log *logrus.Entry
}

// execute runs j's operation.
func (d *Daemon) execute(ctx context.Context, j *job) (outcome, error) {
	r := &jobRun{d: d, j: j, log: d.log.WithFields(logrus.Fields{"job": j.id, "op": j.op})}
	if j.chain != nil {
		r.c = j.chain.c
		r.log = r.log.WithField("chain", r.c.Name)
	}
	switch j.op {
	case dbusapi.OpOpen:
		return r.open(ctx)
	case dbusapi.OpClose:
		return r.close(ctx)
	case dbusapi.OpReconcile, dbusapi.OpCheck:
		return r.reconcile(ctx)
	case dbusapi.OpLuksInit:
		if j.spec.Keystore != nil {
			if err := r.readyKeystore(ctx, *j.spec.Keystore); err != nil {
				return outcome{}, err
			}
		}
		if err := d.engine.LuksInit(ctx, j.spec, r.progress); err != nil {
			return outcome{}, err
		}
		return outcome{message: "container created"}, nil
	case dbusapi.OpKeystoreUnlock:
		return r.keystoreUnlock(ctx)
	case dbusapi.OpKeystoreInit:
		return r.keystoreInit(ctx)
	case dbusapi.OpKeystoreLock:
		if err := d.engine.KeystoreLock(ctx, chains.Keystore{Dir: j.keystore}); err != nil {
			return outcome{}, err
		}
		return outcome{message: "locked"}, nil
	}
	return outcome{}, fmt.Errorf("unknown operation %s", j.op)
}

// progress shows a step on the job and, while it opens or closes, on its chain.
func (r *jobRun) progress(p chains.Progress) {
	j := r.j
	r.d.post(func() {
		j.step, j.steps, j.desc = p.Step, p.Steps, p.Desc
		if p.Total > 0 {
			j.bytes, j.total = uint64(p.Bytes), uint64(p.Total)
		}
		r.d.jobChanged(j)
		if cs := j.chain; cs != nil && cs.state.Busy() && cs.running == j {
			cs.step, cs.steps = p.Step, p.Steps
			r.d.publish(cs, cs.state, j.reason)
		}
	})
}

// hook runs one of a configured chain's commands (ad-hoc chains have none) and logs a
// failure; whether it vetoes is the caller's to decide.
func (r *jobRun) hook(ctx context.Context, name, command string) error {
	if command == "" || !r.j.chain.managed {
		return nil
	}
	err := r.d.o.Hook(ctx, command, hookEnv(r.c, string(r.j.op)))
	if err != nil {
		r.log.WithError(err).WithField("hook", name).Warn("hook command failed")
	}
	return err
}

func (r *jobRun) open(ctx context.Context) (outcome, error) {
	c, j := r.c, r.j
	if j.auto {
		present, err := r.d.engine.SourcePresent(ctx, c)
		if err != nil {
			return outcome{state: dbusapi.ChainFailed, attempt: true}, err
		}
		if !present {
			return outcome{state: dbusapi.ChainWaiting, waiting: "waiting for " + c.SourceDevice + " in " + c.SourceVM, message: "source device absent"}, nil
		}
	}
	if err := r.hook(ctx, "pre open", c.PreOpen); err != nil {
		return outcome{state: dbusapi.ChainFailed, attempt: j.auto}, fmt.Errorf("pre open command vetoed the open: %w", err)
	}
	err := r.d.engine.Open(ctx, c, j.openOpts, r.progress)
	switch {
	case errors.Is(err, chains.ErrAlreadyOpen):
		return outcome{state: dbusapi.ChainOpen, message: "already open"}, nil
	case errors.Is(err, chains.ErrCanceled) || errors.Is(err, context.Canceled):
		return outcome{state: dbusapi.ChainClosed}, err // rolled back: nothing of it is left
	case errors.Is(err, chains.ErrAutostartOff) && !j.auto:
		return outcome{state: dbusapi.ChainWaiting}, err // it opens when its qubes run
	case errors.Is(err, chains.ErrKeystoreLocked):
		// Nothing was touched (keys are read first); an unlock opens it.
		return outcome{state: dbusapi.ChainWaiting, cause: dbusapi.CauseKeystoreLocked,
			waiting: "waiting for key store " + strings.Join(c.KeystoreDirs(), ", ") + " to be unlocked (qcryptctl keystore unlock)"}, err
	case err != nil:
		return outcome{state: dbusapi.ChainFailed, attempt: j.auto}, err
	}
	_ = r.hook(ctx, "post open", c.PostOpen) // the chain is open either way
	return outcome{state: dbusapi.ChainOpen, message: "open"}, nil
}

func (r *jobRun) close(ctx context.Context) (outcome, error) {
	c := r.c
	how := chains.Closing{Held: r.j.held,
		BeforeSteps: func(ctx context.Context) { _ = r.hook(ctx, "pre close", c.PreClose) }} // a close is never vetoed
	switch err := r.d.engine.Close(ctx, c, r.j.closeOpts, how, r.progress); {
	case errors.Is(err, chains.ErrNotOpen):
		return outcome{state: dbusapi.ChainClosed, message: "not open"}, nil // nothing to do, nothing was touched
	case errors.Is(err, chains.ErrOtherChain):
		return outcome{state: dbusapi.ChainClosed}, err // nothing of this chain is open; nothing was touched
	case err != nil:
		return outcome{state: dbusapi.ChainDegraded}, err
	}
	_ = r.hook(ctx, "post close", c.PostClose) // the chain is closed either way
	return outcome{state: dbusapi.ChainClosed, message: "closed"}, nil
}

// reconcile compares the chain with its journal (reconcile, at start-up and reconnect)
// or with what it was (check, after an event), and closes what an interrupted job or a
// broken chain left.
func (r *jobRun) reconcile(ctx context.Context) (outcome, error) {
	c, j, e := r.c, r.j, r.d.engine
	st, err := e.Status(ctx, c)
	if err != nil {
		return outcome{state: dbusapi.ChainDegraded}, err
	}
	var rec *chains.Record
	var journalErr error
	if j.op == dbusapi.OpReconcile {
		if rec, journalErr = r.d.journal.Read(c.Name); journalErr != nil {
			r.log.WithError(journalErr).Warn("cannot read the journal")
		}
	}
	decision := chains.Reconcile(rec, st)
	userClosed := j.op == dbusapi.OpReconcile && r.d.journal.UserClosed(c.Name)
	if j.op == dbusapi.OpCheck && decision == chains.DecideDegraded {
		// A chain that was open and broke (a qube or device went away): close what is left.
		decision = chains.DecideFinishClose
	}
	r.log.WithFields(logrus.Fields{"decision": decision.String(), "missing": st.Missing}).Info("reconciled")
	switch decision {
	case chains.DecideAdopt:
		return outcome{state: dbusapi.ChainOpen, cause: dbusapi.CauseFoundOpen, message: "found open"}, nil
	case chains.DecideClosed:
		return outcome{state: dbusapi.ChainClosed, message: "closed", userClosed: userClosed}, nil
	case chains.DecideRollback, chains.DecideFinishClose:
		// Clients must not see "closed" while devices are still being taken down.
		r.d.post(func() {
			if j.chain.running == j {
				why := dbusapi.Because(dbusapi.CauseFinishClose, j.reason.Text+": "+decision.String())
				if decision == chains.DecideRollback {
					why.Cause = dbusapi.CauseRollBack
				}
				r.d.setState(j.chain, dbusapi.ChainClosing, "", why)
			}
		})
		if err := e.Close(ctx, c, chains.CloseOptions{}, chains.Closing{}, r.progress); err != nil && !errors.Is(err, chains.ErrNotOpen) {
			return outcome{state: dbusapi.ChainDegraded}, err
		}
		return outcome{state: dbusapi.ChainClosed, message: decision.String() + ": closed", userClosed: userClosed}, nil
	}
	if journalErr != nil {
		return outcome{state: dbusapi.ChainDegraded}, fmt.Errorf("partly open (%d steps missing) and its record is unreadable (%w): close it with force", st.Missing, journalErr)
	}
	return outcome{state: dbusapi.ChainDegraded}, fmt.Errorf("partly open (%d steps missing) with no record of how: close it with force", st.Missing)
}

// completed runs in the loop when a job's goroutine ends.
func (d *Daemon) completed(j *job, res outcome, err error) {
	cs := j.chain
	if cs != nil {
		switch {
		case res.attempt:
			cs.lastAttempt = time.Now()
		case res.state == dbusapi.ChainOpen:
			// The interval spaces failed attempts; after a success the next trigger opens.
			cs.lastAttempt, cs.retryAt = time.Time{}, time.Time{}
			if cs.retry != nil {
				cs.retry.Stop()
			}
		}
		why := dbusapi.Because(dbusapi.CauseDone, res.message)
		if res.cause != "" {
			why.Cause = res.cause
		}
		if err != nil {
			cs.lastError = err.Error()
			why = dbusapi.Because(dbusapi.CauseError, err.Error())
			if res.cause != "" {
				why.Cause = res.cause // a failure that has its own cause (a locked key store)
			}
			d.chainLog(cs).WithError(err).WithField("op", j.op).Error("operation failed")
		} else if res.state == dbusapi.ChainOpen || res.state == dbusapi.ChainClosed {
			cs.lastError = ""
		}
		if res.state != "" {
			d.setState(cs, res.state, res.waiting, why)
			cs.held = err == nil && res.state == dbusapi.ChainOpen && j.breaks == cs.breaks
		}
		cs.running = nil
		if cs.state == dbusapi.ChainClosed || cs.state == dbusapi.ChainWaiting || cs.state == dbusapi.ChainFailed {
			defer d.wakeSharers(cs)
		}
	}
	if err == nil && j.canceled {
		err = context.Canceled
	}
	if err == nil {
		j.message = res.message
	}
	d.finish(j, err, err == nil)
	if err == nil {
		switch {
		case j.op == dbusapi.OpKeystoreUnlock || j.op == dbusapi.OpKeystoreInit:
			d.keystoreUnlocked(j.keystore)
		case j.op == dbusapi.OpLuksInit && j.spec.Keystore != nil:
			d.keystoreUnlocked(j.spec.Keystore.Dir)
		}
	}
	if cs == nil {
		return
	}
	if cs.pending != nil {
		next := cs.pending
		cs.pending = nil
		d.start(next)
		return
	}
	if cs.missedResync {
		cs.missedResync = false
		// A failed ad-hoc chain is removed below as without a resync: no record of it
		// stays for a reconcile to work on, and its entry would refuse the next spec.
		if cs.state == dbusapi.ChainDegraded || cs.state == dbusapi.ChainFailed && cs.managed {
			// The job may have failed because qubesd went away: what it left is put
			// right by the journal, as at any reconnect.
			d.enqueue(d.newJob(dbusapi.OpReconcile, cs, 0, true, dbusapi.Because(dbusapi.CauseQubesd, "qubesd connection re-established during "+string(j.op))))
			return
		}
	}
	if cs.removed && (cs.state == dbusapi.ChainClosed || cs.state == dbusapi.ChainWaiting || cs.state == dbusapi.ChainFailed) {
		d.removeChain(cs)
		return
	}
	if !cs.managed && cs.state != dbusapi.ChainOpen && cs.state != dbusapi.ChainDegraded {
		// An ad-hoc chain exists while something of it is open: a closed or failed
		// (rolled back) one goes, so repeated requests cannot grow objects or files.
		d.removeChain(cs)
		return
	}
	// Only a reconcile (start-up, reconnect), a failed automatic open or a trigger that
	// came during a close leads to another automatic attempt here; a chain the user
	// closed stays closed until a trigger after the close.
	trigger := cs.trigger
	cs.trigger = dbusapi.Reason{}
	switch {
	case j.op == dbusapi.OpClose && !j.auto:
		// The user closed it: it stays closed until a trigger after the close.
	case trigger.Cause != "":
		d.evaluate(cs, trigger)
	case j.op == dbusapi.OpReconcile && res.userClosed:
		d.consider(cs, dbusapi.Because(dbusapi.CauseClosedByUser, "closed by the user before qcryptd restarted"), false)
	case j.op == dbusapi.OpReconcile:
		d.evaluate(cs, j.reason)
	case j.op == dbusapi.OpOpen && cs.state == dbusapi.ChainWaiting:
		d.consider(cs, j.reason, false) // say what it waits for
	case j.op == dbusapi.OpOpen && !j.auto && cs.state == dbusapi.ChainClosed:
		d.consider(cs, j.reason, false)
	case j.op == dbusapi.OpOpen && j.auto && cs.state == dbusapi.ChainFailed:
		// Retry after the startup interval; with none, at the next trigger (never in a loop).
		if cs.c.StartupInterval > 0 {
			d.scheduleRetry(cs, cs.lastAttempt.Add(cs.c.StartupInterval))
		}
	case j.op == dbusapi.OpCheck && cs.state == dbusapi.ChainClosed:
		// What was left of a broken chain is closed: it is a closed chain like any other,
		// so open it if it can be, else say what it waits for (e.g. the disk that went).
		d.evaluate(cs, j.reason)
	case j.auto:
		d.consider(cs, j.reason, false)
	}
}

// finish ends a job: state, message, Completed signal, removal after a while.
func (d *Daemon) finish(j *job, err error, success bool) {
	switch {
	case success:
		j.state = dbusapi.JobDone
	case errors.Is(err, context.Canceled) || errors.Is(err, chains.ErrCanceled):
		j.state = dbusapi.JobCanceled
	default:
		j.state = dbusapi.JobFailed
	}
	if err != nil {
		j.message = err.Error()
	} else if j.message == "" {
		j.message = string(j.state)
	}
	if j.chain != nil && j.chain.pending == j {
		j.chain.pending = nil
	}
	// What the caller passed is not kept past its job.
	for _, k := range j.openOpts.InjectKeys {
		clear(k)
	}
	if j.release != nil {
		j.release()
		j.release = nil
	}
	d.pub.JobCompleted(j.info(), success)
	for _, f := range j.done {
		f(success)
	}
	time.AfterFunc(d.o.JobLinger, func() {
		d.post(func() {
			delete(d.jobs, j.id)
			d.pub.JobRemoved(j.id)
		})
	})
}

func (d *Daemon) jobChanged(j *job) {
	d.pub.JobChanged(j.info())
}

func (d *Daemon) removeChain(cs *chainState) {
	if cs.retry != nil {
		cs.retry.Stop()
	}
	delete(d.chains, cs.c.Name)
	if !cs.managed {
		if err := d.journal.Remove(cs.c.Name); err != nil {
			d.chainLog(cs).WithError(err).Warn("cannot remove the journal of an ad-hoc chain")
		}
	}
	d.pub.ChainRemoved(cs.c.Name)
	d.updateSummary()
}

// wakeSharers lets the waiting chains that share cs's mapper in a qube open now that cs
// no longer holds it (consider says again what each still waits for).
func (d *Daemon) wakeSharers(cs *chainState) {
	for _, name := range d.sortedNames() {
		if other := d.chains[name]; other != cs && other.state == dbusapi.ChainWaiting && sharedMapper(other.c, cs.c) != "" {
			d.consider(other, dbusapi.Because(dbusapi.CauseMapperFreed, "chain "+cs.c.Name+" let go of mapper "+cs.c.Key), true)
		}
	}
}

// journalUserClosed records whether the user closed cs last (see Journal.SetUserClosed).
func (d *Daemon) journalUserClosed(cs *chainState, closed bool) {
	if err := d.journal.SetUserClosed(cs.c.Name, closed); err != nil {
		d.chainLog(cs).WithError(err).Warn("cannot record the user's close")
	}
}

// readyKeystore unlocks the store luks-init adds keys to, or creates it when there is
// none, as the original's luks-init --keystore did.
func (r *jobRun) readyKeystore(ctx context.Context, k chains.Keystore) error {
	st, err := r.d.engine.KeystoreStatus(ctx, k)
	switch {
	case err != nil:
		return err
	case !st.Exists:
		password, err := r.askPassword(ctx, "New password for the qcrypt key store "+k.Dir)
		if err != nil {
			return fmt.Errorf("cannot create %s: %w", k.Dir, err)
		}
		defer clear(password)
		return r.d.engine.KeystoreInit(ctx, k, password)
	case st.Unlocked:
		return nil
	}
	_, err = r.unlock(ctx, k, st)
	return err
}

// keystoreUnlock unlocks a key store: without a password when it is open already (an
// earlier unlock this boot, or the original), else with the one an agent gives (the
// caller may answer its own question).
func (r *jobRun) keystoreUnlock(ctx context.Context) (outcome, error) {
	k := chains.Keystore{Dir: r.j.keystore}
	st, err := r.d.engine.KeystoreStatus(ctx, k)
	switch {
	case err != nil:
		return outcome{}, err
	case !st.Exists:
		return outcome{}, fmt.Errorf("cannot unlock %s: %w", k.Dir, chains.ErrKeystoreMissing)
	case st.Unlocked:
		return outcome{message: "unlocked already"}, nil
	}
	msg, err := r.unlock(ctx, k, st)
	return outcome{message: msg}, err
}

// unlock unlocks an existing, locked store: without a password when it is open
// already, else with the one an agent gives.
func (r *jobRun) unlock(ctx context.Context, k chains.Keystore, st chains.KeystoreState) (string, error) {
	if st.Open {
		if err := r.d.engine.KeystoreUnlock(ctx, k, nil); err != nil {
			return "", err
		}
		return "unlocked (it was open already: no password needed)", nil
	}
	password, err := r.askPassword(ctx, "Password for the qcrypt key store "+k.Dir)
	if err != nil {
		return "", fmt.Errorf("cannot unlock %s: %w", k.Dir, err)
	}
	defer clear(password)
	if err := r.d.engine.KeystoreUnlock(ctx, k, password); err != nil {
		return "", err
	}
	return "unlocked", nil
}

// keystoreInit creates a store, as blib does, with a password an agent gives.
func (r *jobRun) keystoreInit(ctx context.Context) (outcome, error) {
	k := chains.Keystore{Dir: r.j.keystore}
	st, err := r.d.engine.KeystoreStatus(ctx, k)
	if err != nil {
		return outcome{}, err
	}
	if st.Exists {
		return outcome{}, fmt.Errorf("cannot create a key store in %s: %w", k.Dir, chains.ErrKeystoreExists)
	}
	password, err := r.askPassword(ctx, "New password for the qcrypt key store "+k.Dir)
	if err != nil {
		return outcome{}, fmt.Errorf("cannot create %s: %w", k.Dir, err)
	}
	defer clear(password)
	if err := r.d.engine.KeystoreInit(ctx, k, password); err != nil {
		return outcome{}, err
	}
	return outcome{message: "created and unlocked"}, nil
}

// askPassword asks systemd's password agents; besides root, the user who started the
// job may answer its question (qcryptctl answers its own).
func (r *jobRun) askPassword(ctx context.Context, message string) ([]byte, error) {
	answerer := int(r.j.uid)
	if r.j.uid == 0 {
		answerer = -1 // root answers anyway
	}
	return systemd.Ask(ctx, systemd.Question{Dir: r.d.o.AskPasswordDir, Message: message, Icon: "dialog-password",
		ID: dbusapi.PasswordQuestionID(r.j.id), Timeout: keystorePasswordWait, AnswerUID: answerer})
}

// keystorePasswordWait is how long an unlock waits for a password.
const keystorePasswordWait = 5 * time.Minute

// keystoreUnlocked lets the chains that wait for the store open.
func (d *Daemon) keystoreUnlocked(dir string) {
	for _, name := range d.sortedNames() {
		cs := d.chains[name]
		if (cs.state == dbusapi.ChainWaiting || cs.state == dbusapi.ChainFailed) && slices.Contains(cs.c.KeystoreDirs(), dir) {
			d.evaluate(cs, dbusapi.Because(dbusapi.CauseKeystoreOpened, "key store "+dir+" unlocked"))
		}
	}
}
