package daemon

import (
	"testing"

	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

// docs/states.md is the state machine setState holds changes against.
func TestStatesDoc(t *testing.T) {
	testkit.Golden(t, "../docs/states.md", StatesMarkdown())
}

// Every state has its row; no state changes to itself by the table (staying is always
// allowed) or to a state that does not exist.
func TestTransitionTable(t *testing.T) {
	known := map[dbusapi.ChainState]bool{}
	for _, s := range dbusapi.ChainStates {
		known[s] = true
	}
	for _, from := range dbusapi.ChainStates {
		to, ok := transitions[from]
		if !ok {
			t.Errorf("no row for %s", from)
		}
		for _, s := range to {
			if s == from || !known[s] {
				t.Errorf("%s -> %s", from, s)
			}
		}
	}
	if len(transitions) != len(dbusapi.ChainStates) {
		t.Errorf("%d rows for %d states", len(transitions), len(dbusapi.ChainStates))
	}
}
