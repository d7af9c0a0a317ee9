// Package systemd holds qcryptd's systemd integration: sd_notify, the watchdog, the
// journald log hook, and the unit, D-Bus policy and activation files it installs.
package systemd

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/coreos/go-systemd/v22/journal"
	"github.com/sirupsen/logrus"
)

// Notify sends one sd_notify state; it does nothing outside systemd.
func Notify(state string) error {
	_, err := daemon.SdNotify(false, state)
	return err
}

// WatchdogInterval is how often to ping: half of WatchdogSec, or 0 when it is off.
func WatchdogInterval() time.Duration {
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil || d <= 0 {
		return 0
	}
	return d / 2
}

// JournalHook sends logrus entries to journald with structured fields: logrus field
// "chain" becomes CHAIN=, "vm" VM=, and so on; SYSLOG_IDENTIFIER=qcryptd.
type JournalHook struct {
	Identifier string
	// Send is journal.Send (replaced in tests).
	Send func(message string, priority journal.Priority, vars map[string]string) error
	mu   sync.Mutex
}

// NewJournalHook returns a hook for identifier.
func NewJournalHook(identifier string) *JournalHook {
	return &JournalHook{Identifier: identifier, Send: journal.Send}
}

// Levels are all levels.
func (h *JournalHook) Levels() []logrus.Level { return logrus.AllLevels }

var priorities = map[logrus.Level]journal.Priority{
	logrus.PanicLevel: journal.PriEmerg, logrus.FatalLevel: journal.PriCrit, logrus.ErrorLevel: journal.PriErr,
	logrus.WarnLevel: journal.PriWarning, logrus.InfoLevel: journal.PriInfo, logrus.DebugLevel: journal.PriDebug,
	logrus.TraceLevel: journal.PriDebug,
}

// Fire sends one entry. Values are printed with %v and cut to 4 KiB; keys are made
// valid journal field names.
func (h *JournalHook) Fire(e *logrus.Entry) error {
	vars := map[string]string{"SYSLOG_IDENTIFIER": h.Identifier}
	for k, v := range e.Data {
		key := FieldName(k)
		if key == "" || key == "MESSAGE" || key == "PRIORITY" || key == "SYSLOG_IDENTIFIER" {
			continue
		}
		s := fmt.Sprint(v)
		if len(s) > 4096 {
			s = s[:4096]
		}
		vars[key] = s
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.Send(e.Message, priorities[e.Level], vars); err != nil {
		// Not lost: fall back to stderr, which systemd also collects.
		line, _ := (&logrus.TextFormatter{DisableColors: true}).Format(e)
		os.Stderr.Write(line)
	}
	return nil
}

// FieldName maps a logrus key to a journal field: upper case, [A-Z0-9_], no leading _.
func FieldName(k string) string {
	var b strings.Builder
	for _, r := range strings.ToUpper(k) {
		if r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return strings.TrimLeft(b.String(), "_0123456789")
}

// SetupLogging logs to journald when stderr is the journal stream (running as a
// unit), otherwise as readable text on stderr.
func SetupLogging(l *logrus.Logger, identifier string) {
	if ok, _ := journal.StderrIsJournalStream(); ok {
		l.AddHook(NewJournalHook(identifier))
		l.SetOutput(discard{})
		return
	}
	l.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: time.RFC3339, SortingFunc: sortFields})
}

// sortFields puts chain, vm and layer first.
func sortFields(keys []string) {
	rank := map[string]int{"chain": 0, "vm": 1, "layer": 2}
	sort.SliceStable(keys, func(i, j int) bool {
		ri, oki := rank[keys[i]]
		rj, okj := rank[keys[j]]
		switch {
		case oki && okj:
			return ri < rj
		case oki != okj:
			return oki
		}
		return keys[i] < keys[j]
	})
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }
