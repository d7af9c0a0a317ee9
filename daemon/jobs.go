package daemon

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
)

func (j *job) info() dbusapi.JobInfo {
	name := ""
	if j.chain != nil {
		name = j.chain.c.Name
	}
	return dbusapi.JobInfo{ID: j.id, Operation: j.op, Chain: name, State: j.state, Step: uint32(j.step), Steps: uint32(j.steps),
		StepDescription: j.desc, Bytes: j.bytes, TotalBytes: j.total, Message: j.message, UID: j.uid}
}

func (d *Daemon) newJob(op string, cs *chainState, uid uint32, auto bool, reason string) *job {
	d.nextJob++
	j := &job{id: d.nextJob, op: op, chain: cs, uid: uid, auto: auto, reason: reason, state: "queued"}
	d.jobs[j.id] = j
	if d.pub != nil {
		d.pub.JobAdded(j.info())
	}
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
func wanted(cs *chainState, op string) bool {
	return cs.running != nil && cs.running.op == op && cs.pending == nil || cs.pending != nil && cs.pending.op == op
}

func (d *Daemon) start(j *job) {
	if d.stopping {
		// Nothing new starts while shutdown waits for the running jobs.
		d.finish(j, dbusapi.Errorf(dbusapi.ReasonShuttingDown, "qcryptd is stopping"), false)
		return
	}
	cs := j.chain
	if cs != nil {
		cs.running = j
	}
	ctx, cancel := context.WithCancel(context.Background())
	j.cancel = cancel
	j.state = "running"
	d.jobChanged(j)
	if cs != nil {
		switch {
		case j.op == "open" && cs.state != StateOpen: // an open of an open chain changes nothing
			d.setState(cs, StateOpening, "", j.reason)
			if cs.managed {
				d.journalUserClosed(cs, false)
			}
		case j.op == "close":
			d.setState(cs, StateClosing, "", j.reason)
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
	state, waiting, message string
	attempt                 bool // a failed automatic open: counts for the startup interval
	userClosed              bool // reconcile: the user closed the chain last; no automatic open before a trigger
}

// execute runs in the job's goroutine; it must not touch daemon state.
func (d *Daemon) execute(ctx context.Context, j *job) (outcome, error) {
	progress := func(p chains.Progress) {
		d.post(func() {
			j.step, j.steps, j.desc = p.Step, p.Steps, p.Desc
			if p.Total > 0 {
				j.bytes, j.total = uint64(p.Bytes), uint64(p.Total)
			}
			d.jobChanged(j)
			if cs := j.chain; cs != nil && (cs.state == StateOpening || cs.state == StateClosing) && cs.running == j {
				cs.step, cs.steps = p.Step, p.Steps
				d.publish(cs, cs.state, j.reason)
			}
		})
	}
	var c *chains.Chain
	if j.chain != nil {
		c = j.chain.c
	}
	log := d.log.WithFields(logrus.Fields{"job": j.id, "op": j.op})
	if c != nil {
		log = log.WithField("chain", c.Name)
	}
	switch j.op {
	case "open":
		if j.auto {
			present, err := d.engine.SourcePresent(ctx, c)
			if err != nil {
				return outcome{state: StateFailed, attempt: true}, err
			}
			if !present {
				return outcome{state: StateWaiting, waiting: "waiting for " + c.SourceDevice + " in " + c.SourceVM, message: "source device absent"}, nil
			}
		}
		if c.PreOpen != "" && j.chain.managed {
			if err := d.o.Hook(ctx, c.PreOpen, hookEnv(c, "open")); err != nil {
				return outcome{state: StateFailed, attempt: j.auto}, fmt.Errorf("pre open command vetoed the open: %w", err)
			}
		}
		err := d.engine.Open(ctx, c, j.openOpts, progress)
		switch {
		case errors.Is(err, chains.ErrAlreadyOpen):
			return outcome{state: StateOpen, message: "already open"}, nil
		case errors.Is(err, chains.ErrCanceled) || errors.Is(err, context.Canceled):
			return outcome{state: StateClosed}, err // rolled back: nothing of it is left
		case errors.Is(err, chains.ErrNotRunning) && !j.auto:
			return outcome{state: StateWaiting}, err // it opens when its qubes run
		case err != nil:
			return outcome{state: StateFailed, attempt: j.auto}, err
		}
		if c.PostOpen != "" && j.chain.managed {
			if err := d.o.Hook(ctx, c.PostOpen, hookEnv(c, "open")); err != nil {
				log.WithError(err).Warn("post open command failed")
			}
		}
		return outcome{state: StateOpen, message: "open"}, nil
	case "close":
		if c.PreClose != "" && j.chain.managed {
			if err := d.o.Hook(ctx, c.PreClose, hookEnv(c, "close")); err != nil {
				log.WithError(err).Warn("pre close command failed (ignored)")
			}
		}
		if err := d.engine.Close(ctx, c, j.closeOpts, progress); errors.Is(err, chains.ErrOtherChain) {
			return outcome{state: StateClosed}, err // nothing of this chain is open; nothing was touched
		} else if err != nil {
			return outcome{state: StateDegraded}, err
		}
		if c.PostClose != "" && j.chain.managed {
			if err := d.o.Hook(ctx, c.PostClose, hookEnv(c, "close")); err != nil {
				log.WithError(err).Warn("post close command failed")
			}
		}
		return outcome{state: StateClosed, message: "closed"}, nil
	case "reconcile", "check":
		st, err := d.engine.Status(ctx, c)
		if err != nil {
			return outcome{state: StateDegraded}, err
		}
		var rec *chains.Record
		var journalErr error
		if j.op == "reconcile" {
			if rec, journalErr = d.engine.Journal.Read(c.Name); journalErr != nil {
				log.WithError(journalErr).Warn("cannot read the journal")
			}
		}
		decision := chains.Reconcile(rec, st)
		userClosed := j.op == "reconcile" && d.engine.Journal.UserClosed(c.Name)
		if j.op == "check" && decision == chains.DecideDegraded {
			// A chain that was open and broke (a qube or device went away): close what is left.
			decision = chains.DecideFinishClose
		}
		log.WithFields(logrus.Fields{"decision": decision.String(), "missing": st.Missing}).Info("reconciled")
		switch decision {
		case chains.DecideAdopt:
			return outcome{state: StateOpen, message: dbusapi.ReasonFoundOpen}, nil
		case chains.DecideClosed:
			return outcome{state: StateClosed, message: "closed", userClosed: userClosed}, nil
		case chains.DecideRollback, chains.DecideFinishClose:
			// Clients must not see "closed" while devices are still being taken down.
			d.post(func() {
				if j.chain.running == j {
					d.setState(j.chain, StateClosing, "", j.reason+": "+decision.String())
				}
			})
			if err := d.engine.Close(ctx, c, chains.CloseOptions{}, progress); err != nil {
				return outcome{state: StateDegraded}, err
			}
			return outcome{state: StateClosed, message: decision.String() + ": closed", userClosed: userClosed}, nil
		}
		if journalErr != nil {
			return outcome{state: StateDegraded}, fmt.Errorf("partly open (%d steps missing) and its record is unreadable (%w): close it with force", st.Missing, journalErr)
		}
		return outcome{state: StateDegraded}, fmt.Errorf("partly open (%d steps missing) with no record of how: close it with force", st.Missing)
	case "luks-init":
		if err := d.engine.LuksInit(ctx, j.spec, progress); err != nil {
			return outcome{}, err
		}
		return outcome{message: "container created"}, nil
	}
	return outcome{}, fmt.Errorf("unknown operation %s", j.op)
}

// completed runs in the loop when a job's goroutine ends.
func (d *Daemon) completed(j *job, res outcome, err error) {
	cs := j.chain
	if cs != nil {
		switch {
		case res.attempt:
			cs.lastAttempt = time.Now()
		case res.state == StateOpen:
			// The interval spaces failed attempts; after a success the next trigger opens.
			cs.lastAttempt, cs.retryAt = time.Time{}, time.Time{}
			if cs.retry != nil {
				cs.retry.Stop()
			}
		}
		msg := res.message
		if err != nil {
			cs.lastError = err.Error()
			msg = err.Error()
			d.chainLog(cs).WithError(err).WithField("op", j.op).Error("operation failed")
		} else if res.state == StateOpen || res.state == StateClosed {
			cs.lastError = ""
		}
		if res.state != "" {
			d.setState(cs, res.state, res.waiting, msg)
		}
		cs.running = nil
		if cs.state == StateClosed || cs.state == StateWaiting || cs.state == StateFailed {
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
		if cs.state == StateDegraded || cs.state == StateFailed {
			// The job may have failed because qubesd went away: what it left is put
			// right by the journal, as at any reconnect.
			d.enqueue(d.newJob("reconcile", cs, 0, true, "qubesd connection re-established during "+j.op))
			return
		}
	}
	if cs.removed && (cs.state == StateClosed || cs.state == StateWaiting || cs.state == StateFailed) {
		d.removeChain(cs)
		return
	}
	if !cs.managed && cs.state != StateOpen && cs.state != StateDegraded {
		// An ad-hoc chain exists while something of it is open: a closed or failed
		// (rolled back) one goes, so repeated requests cannot grow objects or files.
		d.removeChain(cs)
		return
	}
	// Only a reconcile (start-up, reconnect), a failed automatic open or a trigger that
	// came during a close leads to another automatic attempt here; a chain the user
	// closed stays closed until a trigger after the close.
	trigger := cs.trigger
	cs.trigger = ""
	switch {
	case j.op == "close" && !j.auto:
		// The user closed it: it stays closed until a trigger after the close.
	case trigger != "":
		d.evaluate(cs, trigger)
	case j.op == "reconcile" && res.userClosed:
		d.consider(cs, "closed by the user before qcryptd restarted", false)
	case j.op == "reconcile":
		d.evaluate(cs, "")
	case j.op == "open" && cs.state == StateWaiting:
		d.consider(cs, j.reason, false) // say what it waits for
	case j.op == "open" && !j.auto && cs.state == StateClosed:
		d.consider(cs, j.reason, false)
	case j.op == "open" && j.auto && cs.state == StateFailed:
		// Retry after the startup interval; with none, at the next trigger (never in a loop).
		if cs.c.StartupInterval > 0 {
			d.scheduleRetry(cs, cs.lastAttempt.Add(cs.c.StartupInterval))
		}
	case j.op == "check" && cs.state == StateClosed:
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
		j.state = "done"
	case errors.Is(err, context.Canceled) || errors.Is(err, chains.ErrCanceled):
		j.state = "canceled"
	default:
		j.state = "failed"
	}
	if err != nil {
		j.message = err.Error()
	} else if j.message == "" {
		j.message = j.state
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
	if d.pub != nil {
		d.pub.JobCompleted(j.info(), success)
	}
	for _, f := range j.done {
		f(success)
	}
	time.AfterFunc(d.o.JobLinger, func() {
		d.post(func() {
			delete(d.jobs, j.id)
			if d.pub != nil {
				d.pub.JobRemoved(j.id)
			}
		})
	})
}

func (d *Daemon) jobChanged(j *job) {
	if d.pub != nil {
		d.pub.JobChanged(j.info())
	}
}

func (d *Daemon) removeChain(cs *chainState) {
	if cs.retry != nil {
		cs.retry.Stop()
	}
	delete(d.chains, cs.c.Name)
	if !cs.managed {
		if err := d.engine.Journal.Remove(cs.c.Name); err != nil {
			d.chainLog(cs).WithError(err).Warn("cannot remove the journal of an ad-hoc chain")
		}
	}
	if d.pub != nil {
		d.pub.ChainRemoved(cs.c.Name)
	}
	d.updateSummary()
}

// wakeSharers lets the waiting chains that share cs's mapper in a qube open now that cs
// no longer holds it (consider says again what each still waits for).
func (d *Daemon) wakeSharers(cs *chainState) {
	for _, name := range d.sortedNames() {
		if other := d.chains[name]; other != cs && other.state == StateWaiting && sharedMapper(other.c, cs.c) != "" {
			d.consider(other, "chain "+cs.c.Name+" let go of mapper "+cs.c.Key, true)
		}
	}
}

// journalUserClosed records whether the user closed cs last (see Journal.SetUserClosed).
func (d *Daemon) journalUserClosed(cs *chainState, closed bool) {
	if err := d.engine.Journal.SetUserClosed(cs.c.Name, closed); err != nil {
		d.chainLog(cs).WithError(err).Warn("cannot record the user's close")
	}
}
