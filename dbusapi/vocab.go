package dbusapi

// The words qcryptd and its clients share: states, operations and the causes of state
// changes. They are the contract; the daemon, qcryptctl and the notify agent use these
// constants and match on nothing else (never on a text meant for people).

// ChainState is a chain's state: the Chain interface's State property and the first two
// arguments of StateChanged. The transitions between them are in docs/states.md.
type ChainState string

// The chain states.
const (
	ChainClosed   ChainState = "closed"   // nothing of it is open, nothing waits
	ChainWaiting  ChainState = "waiting"  // closed; opens once what Waiting names is there
	ChainOpening  ChainState = "opening"  // an open runs
	ChainOpen     ChainState = "open"     // decrypted (and mounted, if configured)
	ChainClosing  ChainState = "closing"  // a close runs
	ChainDegraded ChainState = "degraded" // partly open without a record of how: needs a decision
	ChainFailed   ChainState = "failed"   // an automatic open failed; tried again later
)

// ChainStates lists every chain state.
var ChainStates = []ChainState{ChainClosed, ChainWaiting, ChainOpening, ChainOpen, ChainClosing, ChainDegraded, ChainFailed}

// Busy reports whether a job runs the chain in this state.
func (s ChainState) Busy() bool { return s == ChainOpening || s == ChainClosing }

// Cause says why a chain changed state: the third argument of StateChanged. The fourth
// is a text for people that says the same with names; clients show it, never parse it.
type Cause string

// The causes of state changes (their meanings: CauseMeanings).
const (
	CauseRequested       Cause = "requested"
	CauseQubeStarted     Cause = "qube-started"
	CauseQubeFailed      Cause = "qube-failed"
	CauseQubeShutDown    Cause = "qube-shut-down"
	CauseQubeUnpaused    Cause = "qube-unpaused"
	CauseQubeCreated     Cause = "qube-created"
	CauseQubeDeleted     Cause = "qube-deleted"
	CauseDeviceAppeared  Cause = "device-appeared"
	CauseDeviceGone      Cause = "device-gone"
	CauseQubesd          Cause = "qubesd-connected"
	CauseRetry           Cause = "retry"
	CauseStartupInterval Cause = "startup-interval"
	CauseConfig          Cause = "config-changed"
	CauseMapperFreed     Cause = "mapper-freed"
	CauseFoundOpen       Cause = "found-open"
	CauseRollBack        Cause = "roll-back"
	CauseFinishClose     Cause = "finish-close"
	CauseClosedByUser    Cause = "closed-by-user"
	CauseEligible        Cause = "eligible"
	CauseKeystoreLocked  Cause = "keystore-locked"
	CauseKeystoreOpened  Cause = "keystore-unlocked"
	CauseSystemShutdown  Cause = "system-shutdown"
	CauseDone            Cause = "done"
	CauseError           Cause = "error"
)

// Causes lists every cause, in the order docs show them.
var Causes = []Cause{CauseRequested, CauseQubeStarted, CauseQubeFailed, CauseQubeShutDown, CauseQubeUnpaused,
	CauseQubeCreated, CauseQubeDeleted, CauseDeviceAppeared, CauseDeviceGone, CauseQubesd, CauseRetry,
	CauseStartupInterval, CauseConfig, CauseMapperFreed, CauseFoundOpen, CauseRollBack, CauseFinishClose,
	CauseClosedByUser, CauseEligible, CauseKeystoreLocked, CauseKeystoreOpened, CauseSystemShutdown, CauseDone, CauseError}

// CauseMeanings says what each cause means, for people (docs/states.md).
var CauseMeanings = map[Cause]string{
	CauseRequested:       "a caller asked (open, close, close-all)",
	CauseQubeStarted:     "a qube of the chain started",
	CauseQubeFailed:      "a qube of the chain failed to start",
	CauseQubeShutDown:    "a qube of the chain shut down",
	CauseQubeUnpaused:    "a qube of the chain was unpaused",
	CauseQubeCreated:     "a qube of the chain was created",
	CauseQubeDeleted:     "a qube of the chain was deleted",
	CauseDeviceAppeared:  "the source's block device appeared",
	CauseDeviceGone:      "a device of the chain went away",
	CauseQubesd:          "qcryptd (re)connected to qubesd",
	CauseRetry:           "the retry after a failure",
	CauseStartupInterval: "an open failed within the startup interval",
	CauseConfig:          "a reload added or removed the chain",
	CauseMapperFreed:     "a chain sharing its mapper name closed",
	CauseFoundOpen:       "qcryptd found it open: nobody opened it now",
	CauseRollBack:        "qcryptd found an open cut short (its journal): what it did is undone",
	CauseFinishClose:     "qcryptd found a close cut short, or a broken chain: what is left is closed",
	CauseClosedByUser:    "the user closed it last (before qcryptd restarted): no automatic open before a trigger",
	CauseEligible:        "everything it needs is there",
	CauseKeystoreLocked:  "it injects a key from a key store that is locked: it waits for an unlock",
	CauseKeystoreOpened:  "a key store it injects a key from was unlocked",
	CauseSystemShutdown:  "the system is shutting down: qcryptd closes every chain before the qubes are stopped",
	CauseDone:            "the job of the previous state ended well",
	CauseError:           "the job of the previous state failed",
}

// Reason is why a chain changed state: a Cause for programs and a Text for people.
type Reason struct {
	Cause Cause
	Text  string
}

// Because makes a Reason.
func Because(c Cause, text string) Reason { return Reason{Cause: c, Text: text} }

// JobOperation is what a job does: the Job interface's Operation property.
type JobOperation string

// The job operations.
const (
	OpOpen           JobOperation = "open"
	OpClose          JobOperation = "close"
	OpLuksInit       JobOperation = "luks-init"
	OpCheck          JobOperation = "check"     // qcryptd checks an open chain after an event
	OpReconcile      JobOperation = "reconcile" // qcryptd compares a chain with its journal
	OpKeystoreUnlock JobOperation = "keystore-unlock"
	OpKeystoreLock   JobOperation = "keystore-lock"
	OpKeystoreInit   JobOperation = "keystore-init"
)

// JobOperations lists every job operation.
var JobOperations = []JobOperation{OpOpen, OpClose, OpLuksInit, OpCheck, OpReconcile, OpKeystoreUnlock, OpKeystoreLock, OpKeystoreInit}

// JobState is where a job is: the Job interface's State property.
type JobState string

// The job states.
const (
	JobQueued   JobState = "queued"
	JobRunning  JobState = "running"
	JobDone     JobState = "done"
	JobFailed   JobState = "failed"
	JobCanceled JobState = "canceled"
)

// JobStates lists every job state.
var JobStates = []JobState{JobQueued, JobRunning, JobDone, JobFailed, JobCanceled}

// Ended reports whether a job in this state is over.
func (s JobState) Ended() bool { return s == JobDone || s == JobFailed || s == JobCanceled }
