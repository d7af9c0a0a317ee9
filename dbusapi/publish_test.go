package dbusapi

import (
	"testing"

	"github.com/sirupsen/logrus"
	"github.com/sirupsen/logrus/hooks/test"
)

// What the publisher cannot put on the bus is logged with the object it concerns; on a
// live bus nothing is.
func TestPublishFailuresAreLogged(t *testing.T) {
	conn := connect(t, privateBus(t))
	log, hook := test.NewNullLogger()
	log.SetLevel(logrus.DebugLevel)
	s := NewServer(conn, nil, logrus.NewEntry(log))

	s.ChainAdded(ChainInfo{Name: "demo", State: "closed"})
	s.ChainChanged(ChainInfo{Name: "demo", State: "opening"}, "closed", Because(CauseRequested, "asked"))
	s.JobAdded(JobInfo{ID: 1, Operation: "open", Chain: "demo", State: "running"})
	if entries := hook.AllEntries(); len(entries) != 0 {
		t.Fatalf("on a live bus: %d entries logged, first %q", len(entries), entries[0].Message)
	}

	conn.Close()
	s.ChainChanged(ChainInfo{Name: "demo", State: "open"}, "opening", Because(CauseDone, "open"))
	s.JobCompleted(JobInfo{ID: 1, Operation: "open", Chain: "demo", State: "done"}, true)
	s.ChainAdded(ChainInfo{Name: "other", State: "closed"})
	want := map[string]bool{"demo": false, "other": false}
	for _, e := range hook.AllEntries() {
		chain, _ := e.Data["chain"].(string)
		if _, ok := want[chain]; !ok || e.Data[logrus.ErrorKey] == nil {
			t.Errorf("entry %q %v: no chain or no error", e.Message, e.Data)
			continue
		}
		if e.Level != logrus.DebugLevel {
			t.Errorf("entry %q at %s: a closed bus is expected, want debug", e.Message, e.Level)
		}
		want[chain] = true
	}
	for chain, seen := range want {
		if !seen {
			t.Errorf("nothing logged for %s, whose signals were lost", chain)
		}
	}
}
