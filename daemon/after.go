package daemon

import (
	"context"
	"time"

	"github.com/qcrypt/qcrypt/dbusapi"
)

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
		if settled(cs.state) {
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
	f := followUpOf(jobEnd{op: j.op, auto: j.auto, userClosed: res.userClosed, state: cs.state, managed: cs.managed,
		removed: cs.removed, pending: cs.pending != nil, missedResync: cs.missedResync, trigger: cs.trigger.Cause != "",
		retries: cs.c.StartupInterval > 0})
	if f == startPending {
		next := cs.pending
		cs.pending = nil
		d.start(next)
		return
	}
	cs.missedResync = false
	switch f {
	case reconcileNow:
		// The job may have failed because qubesd went away: what it left is put right
		// by the journal, as at any reconnect.
		d.enqueue(d.newJob(dbusapi.OpReconcile, cs, 0, true, dbusapi.Because(dbusapi.CauseQubesd, "qubesd connection re-established during "+string(j.op))))
		return
	case forget:
		d.removeChain(cs)
		return
	}
	trigger := cs.trigger
	cs.trigger = dbusapi.Reason{}
	switch f {
	case openOnTrigger:
		d.consider(cs, trigger, mayOpen)
	case openIfEligible:
		d.consider(cs, j.reason, mayOpen)
	case sayWaiting:
		d.consider(cs, j.reason, waitOnly)
	case sayWaitingUserClosed:
		d.consider(cs, dbusapi.Because(dbusapi.CauseClosedByUser, "closed by the user before qcryptd restarted"), waitOnly)
	case retryLater:
		d.scheduleRetry(cs, cs.lastAttempt.Add(cs.c.StartupInterval))
	}
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
			d.consider(other, dbusapi.Because(dbusapi.CauseMapperFreed, "chain "+cs.c.Name+" let go of mapper "+cs.c.Key), mayOpen)
		}
	}
}

// journalUserClosed records whether the user closed cs last (see Journal.SetUserClosed).
func (d *Daemon) journalUserClosed(cs *chainState, closed bool) {
	if err := d.journal.SetUserClosed(cs.c.Name, closed); err != nil {
		d.chainLog(cs).WithError(err).Warn("cannot record the user's close")
	}
}

// followUp is what qcryptd does for a chain after one of its jobs ended.
type followUp int

const (
	stay                 followUp = iota // nothing more: e.g. the user closed it, it stays closed
	startPending                         // a job queued behind this one runs now
	reconcileNow                         // qubesd reconnected during the job: the journal puts right what it left
	forget                               // the chain goes: its file was removed, or an ad-hoc chain ended
	openOnTrigger                        // a trigger came during the job: open if eligible, because of it
	openIfEligible                       // open if eligible, else say what it waits for
	sayWaiting                           // say what it waits for; no automatic open
	sayWaitingUserClosed                 // as sayWaiting: the user closed it last before qcryptd restarted
	retryLater                           // a failed automatic open: again after the startup interval
)

// jobEnd is what decides the follow-up: the job, and its chain with the job's outcome
// applied.
type jobEnd struct {
	op               dbusapi.JobOperation
	auto             bool // qcryptd started the job, not a user
	userClosed       bool // a reconcile found the user closed the chain last
	state            dbusapi.ChainState
	managed, removed bool // a configured chain; its file is gone
	pending          bool // another job waits for the chain
	missedResync     bool // qubesd reconnected while the job ran
	trigger          bool // an event that could open the chain came during the job
	retries          bool // the chain has a startup interval
}

// followUpOf decides what follows a job. Only a reconcile (start-up, reconnect), a
// failed automatic open or a trigger that came during a close leads to another
// automatic attempt; a chain the user closed stays closed until a trigger after the close.
func followUpOf(e jobEnd) followUp {
	switch {
	case e.pending:
		return startPending
	case e.missedResync && (e.state == dbusapi.ChainDegraded || e.state == dbusapi.ChainFailed && e.managed):
		// A failed ad-hoc chain is not reconciled: no record of it stays for a reconcile
		// to work on, and its entry would refuse the next spec.
		return reconcileNow
	case e.removed && settled(e.state):
		return forget
	case !e.managed && e.state != dbusapi.ChainOpen && e.state != dbusapi.ChainDegraded:
		// An ad-hoc chain exists while something of it is open: a closed or failed
		// (rolled back) one goes, so repeated requests cannot grow objects or files.
		return forget
	case e.op == dbusapi.OpClose && !e.auto:
		return stay
	case e.trigger:
		return openOnTrigger
	case e.op == dbusapi.OpReconcile && e.userClosed:
		return sayWaitingUserClosed
	case e.op == dbusapi.OpReconcile:
		return openIfEligible
	case e.op == dbusapi.OpOpen && e.state == dbusapi.ChainWaiting:
		return sayWaiting
	case e.op == dbusapi.OpOpen && !e.auto && e.state == dbusapi.ChainClosed:
		return sayWaiting
	case e.op == dbusapi.OpOpen && e.auto && e.state == dbusapi.ChainFailed:
		// With no startup interval, at the next trigger (never in a loop).
		if e.retries {
			return retryLater
		}
		return stay
	case e.op == dbusapi.OpCheck && e.state == dbusapi.ChainClosed:
		// What was left of a broken chain is closed: it is a closed chain like any other,
		// so it opens if it can, else says what it waits for (e.g. the disk that went).
		return openIfEligible
	case e.auto:
		return sayWaiting
	}
	return stay
}

// settled reports a state in which nothing of the chain is held: closed, waiting to
// open, or failed (rolled back).
func settled(s dbusapi.ChainState) bool {
	return s == dbusapi.ChainClosed || s == dbusapi.ChainWaiting || s == dbusapi.ChainFailed
}
