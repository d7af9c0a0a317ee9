package daemon

import (
	"fmt"
	"slices"
	"strings"

	"github.com/qcrypt/qcrypt/dbusapi"
)

// transitions is the chain state machine: the states each state may change to. setState
// holds every change against it, the tests fail on a change it does not list, and
// docs/states.md is made from it (StatesMarkdown).
var transitions = map[dbusapi.ChainState][]dbusapi.ChainState{
	// A closed chain waits for its qubes, opens, is found open, partly open or still
	// held by an interrupted job (reconcile), or is closed again by force.
	dbusapi.ChainClosed: {dbusapi.ChainWaiting, dbusapi.ChainOpening, dbusapi.ChainClosing, dbusapi.ChainFailed,
		dbusapi.ChainOpen, dbusapi.ChainDegraded},
	dbusapi.ChainWaiting: {dbusapi.ChainOpening, dbusapi.ChainClosing, dbusapi.ChainClosed, dbusapi.ChainOpen,
		dbusapi.ChainDegraded},
	// An open ends open, rolled back (closed), waiting for its qubes, or failed.
	dbusapi.ChainOpening: {dbusapi.ChainOpen, dbusapi.ChainClosed, dbusapi.ChainWaiting, dbusapi.ChainFailed},
	// An open chain is closed, or a check finds it broken (closing what is left, closed,
	// or degraded).
	dbusapi.ChainOpen: {dbusapi.ChainClosing, dbusapi.ChainClosed, dbusapi.ChainDegraded},
	// A close ends closed, or degraded when a step failed.
	dbusapi.ChainClosing: {dbusapi.ChainClosed, dbusapi.ChainDegraded},
	// A degraded chain needs a decision (a forced close or open) or a check, run when a
	// qube of it is unpaused or starts: it closes what is left or finds it whole again.
	dbusapi.ChainDegraded: {dbusapi.ChainOpening, dbusapi.ChainClosing, dbusapi.ChainOpen, dbusapi.ChainClosed},
	dbusapi.ChainFailed: {dbusapi.ChainWaiting, dbusapi.ChainOpening, dbusapi.ChainClosing, dbusapi.ChainOpen,
		dbusapi.ChainClosed, dbusapi.ChainDegraded},
}

// allowedTransition reports whether the state machine lets from change to to; staying
// in a state (with a new Waiting text or step) is always allowed.
func allowedTransition(from, to dbusapi.ChainState) bool {
	return from == to || slices.Contains(transitions[from], to)
}

// StatesMarkdown renders the chain state machine (docs/states.md).
func StatesMarkdown() string {
	var b strings.Builder
	b.WriteString(`# Chain states

Generated from daemon/states.go (` + "`TESTS_UPDATE_GOLDEN=1 go test ./daemon -run TestStatesDoc`" + `);
qcryptd holds every state change against this table, and its tests fail on one it
does not list.

Every change is signalled as ` + "`StateChanged(state, previous, cause, detail)`" + ` on the
chain's object: ` + "`cause`" + ` is one of the causes below, for programs to match on;
` + "`detail`" + ` says the same for people, with names, and is never parsed.

| from | to |
|---|---|
`)
	for _, from := range dbusapi.ChainStates {
		var to []string
		for _, s := range dbusapi.ChainStates {
			if slices.Contains(transitions[from], s) {
				to = append(to, string(s))
			}
		}
		fmt.Fprintf(&b, "| %s | %s |\n", from, strings.Join(to, ", "))
	}
	b.WriteString("\n| cause | meaning |\n|---|---|\n")
	for _, c := range dbusapi.Causes {
		fmt.Fprintf(&b, "| `%s` | %s |\n", c, dbusapi.CauseMeanings[c])
	}
	return b.String()
}
