package daemon

import (
	"testing"

	"github.com/qcrypt/qcrypt/dbusapi"
)

// TestFollowUp holds what follows a job against short stories: who started it, how
// it ended, what happened meanwhile.
func TestFollowUp(t *testing.T) {
	const (
		opOpen, opClose, reconcile, check = dbusapi.OpOpen, dbusapi.OpClose, dbusapi.OpReconcile, dbusapi.OpCheck
		closed, waiting, failed           = dbusapi.ChainClosed, dbusapi.ChainWaiting, dbusapi.ChainFailed
		isOpen, degraded                  = dbusapi.ChainOpen, dbusapi.ChainDegraded
	)
	for _, tc := range []struct {
		story string
		end   jobEnd
		want  followUp
	}{
		{"a job waits behind the one that ended: it runs, whatever else happened",
			jobEnd{op: opClose, state: closed, managed: true, pending: true, missedResync: true, removed: true, trigger: true}, startPending},
		{"qubesd reconnected during a close that failed: the journal puts it right",
			jobEnd{op: opClose, state: degraded, managed: true, missedResync: true}, reconcileNow},
		{"qubesd reconnected during an open that failed",
			jobEnd{op: opOpen, auto: true, state: failed, managed: true, missedResync: true}, reconcileNow},
		{"qubesd reconnected during a failed ad-hoc open: it goes, nothing to reconcile",
			jobEnd{op: opOpen, state: failed, missedResync: true}, forget},
		{"qubesd reconnected during an open that succeeded: nothing to put right",
			jobEnd{op: opOpen, state: isOpen, managed: true, missedResync: true}, stay},
		{"its file was removed and the close ended it",
			jobEnd{op: opClose, auto: true, state: closed, managed: true, removed: true}, forget},
		{"its file was removed but the close failed: it stays until closed (waitOnly leaves a degraded chain be)",
			jobEnd{op: opClose, auto: true, state: degraded, managed: true, removed: true}, sayWaiting},
		{"an ad-hoc chain closed: it goes",
			jobEnd{op: opClose, state: closed}, forget},
		{"an ad-hoc chain that opened stays",
			jobEnd{op: opOpen, state: isOpen}, stay},
		{"an ad-hoc chain left degraded stays, to be closed",
			jobEnd{op: opClose, state: degraded}, stay},
		{"the user closed it: it stays closed, even if a qube started meanwhile",
			jobEnd{op: opClose, state: closed, managed: true, trigger: true}, stay},
		{"qcryptd closed it (a qube went) and a qube started meanwhile: open again",
			jobEnd{op: opClose, auto: true, state: closed, managed: true, trigger: true}, openOnTrigger},
		{"a reconcile found the user closed it before the restart",
			jobEnd{op: reconcile, auto: true, state: closed, managed: true, userClosed: true}, sayWaitingUserClosed},
		{"a reconcile at start-up found it closed: open if it can",
			jobEnd{op: reconcile, auto: true, state: closed, managed: true}, openIfEligible},
		{"an open found a qube missing: say what it waits for",
			jobEnd{op: opOpen, auto: true, state: waiting, managed: true}, sayWaiting},
		{"the user's open was rolled back by a cancel",
			jobEnd{op: opOpen, state: closed, managed: true}, sayWaiting},
		{"an automatic open failed, with a startup interval: retry then",
			jobEnd{op: opOpen, auto: true, state: failed, managed: true, retries: true}, retryLater},
		{"an automatic open failed, without one: never in a loop",
			jobEnd{op: opOpen, auto: true, state: failed, managed: true}, stay},
		{"the user's open failed: no automatic retry",
			jobEnd{op: opOpen, state: failed, managed: true, retries: true}, stay},
		{"a check closed what was left of a broken chain: it opens like any closed one",
			jobEnd{op: check, auto: true, state: closed, managed: true}, openIfEligible},
		{"a check found it whole",
			jobEnd{op: check, auto: true, state: isOpen, managed: true}, sayWaiting},
		{"the user's open succeeded",
			jobEnd{op: opOpen, state: isOpen, managed: true}, stay},
	} {
		if got := followUpOf(tc.end); got != tc.want {
			t.Errorf("%s: follow-up %s, want %s", tc.story, followUpNames[got], followUpNames[tc.want])
		}
	}
}

var followUpNames = []string{stay: "stay", startPending: "startPending", reconcileNow: "reconcileNow", forget: "forget",
	openOnTrigger: "openOnTrigger", openIfEligible: "openIfEligible", sayWaiting: "sayWaiting",
	sayWaitingUserClosed: "sayWaitingUserClosed", retryLater: "retryLater"}
