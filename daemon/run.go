package daemon

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/sirupsen/logrus"
)

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
