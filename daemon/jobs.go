package daemon

import (
	"context"
	"errors"
	"fmt"
	"time"

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
