package chains

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// DefaultStateDir holds the journal (tmpfs: it describes kernel state, which does not
// survive a reboot either).
const DefaultStateDir = "/run/qcryptd"

// Journal keeps, per chain, the record of the operation in progress. Each write is
// atomic (temporary file, fsync, rename), before and after every step.
type Journal struct {
	Dir string
}

// Record is what the journal knows of a chain's last operation.
type Record struct {
	Chain    string         `json:"chain"`
	Op       string         `json:"op"` // open, close
	Started  time.Time      `json:"started"`
	Updated  time.Time      `json:"updated"`
	Steps    []RecordedStep `json:"steps"`
	Finished bool           `json:"finished"`
	Error    string         `json:"error,omitempty"`
	// Adhoc is an ad-hoc chain itself (it has no file): a restarted qcryptd knows it
	// from here, to manage it as before (close it at a shutdown, reconcile it).
	Adhoc *Chain `json:"adhoc,omitempty"`
}

// RecordedStep is one step of a plan and how far it got.
type RecordedStep struct {
	Step
	State string            `json:"state"` // pending, running, done, undone, failed
	Facts map[string]string `json:"facts,omitempty"`
}

func (j *Journal) path(chain string) string {
	return filepath.Join(j.Dir, "chains", chain+".json")
}

// Write stores r atomically.
func (j *Journal) Write(r *Record) error {
	if j == nil {
		return nil
	}
	r.Updated = time.Now().UTC()
	data, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	p := j.path(r.Chain)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("cannot write journal %s: %w", p, err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(p), ".tmp-"+r.Chain+"-")
	if err != nil {
		return fmt.Errorf("cannot write journal %s: %w", p, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("cannot write journal %s: %w", p, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("cannot write journal %s: %w", p, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("cannot write journal %s: %w", p, err)
	}
	if err := os.Rename(tmp.Name(), p); err != nil {
		return fmt.Errorf("cannot write journal %s: %w", p, err)
	}
	return nil
}

// SetUserClosed remembers (or forgets) that the user closed a chain, so that a restart
// of qcryptd does not open it again before the next trigger (a qube or device event).
func (j *Journal) SetUserClosed(chain string, closed bool) error {
	if j == nil {
		return nil
	}
	p := filepath.Join(j.Dir, "chains", chain+".user-closed")
	if !closed {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("cannot write journal %s: %w", p, err)
		}
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("cannot write journal %s: %w", p, err)
	}
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		return fmt.Errorf("cannot write journal %s: %w", p, err)
	}
	return nil
}

// UserClosed reports whether the user closed the chain last.
func (j *Journal) UserClosed(chain string) bool {
	if j == nil {
		return false
	}
	_, err := os.Stat(filepath.Join(j.Dir, "chains", chain+".user-closed"))
	return err == nil
}

// Remove forgets a chain's record (an ad-hoc chain that is gone); none is no error.
func (j *Journal) Remove(chain string) error {
	if j == nil {
		return nil
	}
	if err := os.Remove(j.path(chain)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("cannot remove the journal of %s: %w", chain, err)
	}
	return j.SetUserClosed(chain, false)
}

// Adhoc lists the ad-hoc chains the journal has records of (a record that cannot be
// read, or that describes no valid chain, is left out and told in errs).
func (j *Journal) Adhoc() (cs []*Chain, errs []error) {
	if j == nil {
		return nil, nil
	}
	files, _ := filepath.Glob(filepath.Join(j.Dir, "chains", "*.json"))
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".json")
		r, err := j.Read(name)
		switch {
		case err != nil:
			errs = append(errs, err)
		case r.Adhoc == nil:
		case r.Adhoc.Validate() != nil || r.Adhoc.Name != AdhocName(r.Adhoc) || r.Adhoc.Name != name || r.Adhoc.File != "":
			errs = append(errs, fmt.Errorf("the journal %s describes no valid ad-hoc chain", f))
		default:
			cs = append(cs, r.Adhoc)
		}
	}
	return cs, errs
}

// Read returns the record of a chain, or nil when there is none.
func (j *Journal) Read(chain string) (*Record, error) {
	if j == nil {
		return nil, nil
	}
	p := j.path(chain)
	data, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cannot read journal: %w", err)
	}
	var r Record
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("cannot read journal %s: %w", p, err)
	}
	return &r, nil
}

// Decision is what Reconcile concludes for a chain at start-up.
type Decision int

// The decisions Reconcile makes.
const (
	DecideClosed      Decision = iota // nothing open, nothing to do
	DecideAdopt                       // healthy and complete: take it as open
	DecideRollback                    // an open was interrupted: close what it did
	DecideFinishClose                 // a close was interrupted: finish it
	DecideDegraded                    // partly open without a record: needs a decision
)

func (d Decision) String() string {
	return [...]string{"closed", "adopt", "roll back", "finish closing", "degraded"}[d]
}

// Reconcile decides from the journal and the live state together; the journal alone is
// never trusted (a step may have happened after the last write, or been undone by a
// qube shutdown). What is left of a chain the journal shows qcrypt opening or closing
// is qcrypt's to take down: an open cut short or whose rollback failed (qubesd was
// away) is rolled back; a finished open that broke since (the target shut down while
// qcryptd was stopped) and a close cut short or failed are finished. Only a partial
// chain with no record, or after a clean close, was made by someone else: degraded.
func Reconcile(rec *Record, st *Status) Decision {
	switch {
	case st.Open():
		return DecideAdopt
	case st.Closed():
		return DecideClosed
	case rec == nil:
		return DecideDegraded
	case rec.Op == "open" && (!rec.Finished || rec.Error != ""):
		return DecideRollback
	case rec.Op == "open", rec.Op == "close" && (!rec.Finished || rec.Error != ""):
		return DecideFinishClose
	}
	return DecideDegraded
}
