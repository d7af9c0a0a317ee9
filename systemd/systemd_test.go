package systemd

import (
	"encoding/xml"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/coreos/go-systemd/v22/journal"
	"github.com/sirupsen/logrus"
)

func TestJournalHookFields(t *testing.T) {
	type sent struct {
		msg  string
		pri  journal.Priority
		vars map[string]string
	}
	var got []sent
	h := NewJournalHook("qcryptd")
	h.Send = func(m string, p journal.Priority, v map[string]string) error {
		got = append(got, sent{m, p, v})
		return nil
	}
	l := logrus.New()
	l.SetOutput(discard{})
	l.AddHook(h)
	l.WithFields(logrus.Fields{"chain": "demo", "vm": "work", "layer": 2, "job": 7, "_x-y": "z", "MESSAGE": "spoof"}).Warn("chain state changed")
	l.WithError(errors.New("boom")).Error("operation failed")
	if len(got) != 2 {
		t.Fatalf("sent %d", len(got))
	}
	want := map[string]string{"SYSLOG_IDENTIFIER": "qcryptd", "CHAIN": "demo", "VM": "work", "LAYER": "2", "JOB": "7", "X_Y": "z"}
	for k, v := range want {
		if got[0].vars[k] != v {
			t.Errorf("%s = %q, want %q (all: %v)", k, got[0].vars[k], v, got[0].vars)
		}
	}
	if _, ok := got[0].vars["MESSAGE"]; ok || got[0].msg != "chain state changed" || got[0].pri != journal.PriWarning {
		t.Errorf("first entry %+v", got[0])
	}
	if got[1].pri != journal.PriErr || got[1].vars["ERROR"] != "boom" {
		t.Errorf("second entry %+v", got[1])
	}
}

func TestJournalHookFallsBackToStderr(t *testing.T) {
	h := NewJournalHook("qcryptd")
	h.Send = func(string, journal.Priority, map[string]string) error { return errors.New("no journal") }
	r, w, _ := os.Pipe()
	old := os.Stderr
	os.Stderr = w
	err := h.Fire(&logrus.Entry{Logger: logrus.New(), Message: "kept", Level: logrus.InfoLevel, Data: logrus.Fields{}})
	os.Stderr = old
	w.Close()
	buf := make([]byte, 4096)
	n, _ := r.Read(buf)
	if err != nil || !strings.Contains(string(buf[:n]), "kept") {
		t.Errorf("fallback: %v %q", err, buf[:n])
	}
}

func TestFieldName(t *testing.T) {
	for in, want := range map[string]string{"chain": "CHAIN", "frontend-dev": "FRONTEND_DEV", "_x": "X", "9a": "A", "ü": ""} {
		if got := FieldName(in); got != want {
			t.Errorf("%q: %q, want %q", in, got, want)
		}
	}
}

func TestUnitVerifies(t *testing.T) {
	need(t, "systemd-analyze")
	dir := t.TempDir()
	unit := filepath.Join(dir, "qcryptd.service")
	// systemd-analyze checks that ExecStart exists; point it at a stand-in.
	if err := os.WriteFile(unit, []byte(strings.Replace(Unit, "/usr/bin/qcryptd", "/bin/true", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("systemd-analyze", "verify", unit).CombinedOutput()
	if err != nil || strings.Contains(string(out), "qcryptd.service:") {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
	for _, want := range []string{"Type=notify", "BusName=org.qcrypt.Qcryptd1", "WatchdogSec=", "WantedBy=multi-user.target"} {
		if !strings.Contains(Unit, want) {
			t.Errorf("unit lacks %s", want)
		}
	}
	// Activation starts the alias `systemctl enable` makes: never a disabled qcryptd.
	if !strings.Contains(Activation, "SystemdService=dbus-org.qcrypt.Qcryptd1.service") || !strings.Contains(Activation, "Name=org.qcrypt.Qcryptd1") ||
		!strings.Contains(Unit, "\nAlias=dbus-org.qcrypt.Qcryptd1.service\n") {
		t.Errorf("activation file:\n%s", Activation)
	}
}

// The unit's sandbox scores at most 4.5 in systemd-analyze security (it was 8.1 without
// one) and keeps what luks-init needs in dom0: the loop and device-mapper devices,
// CAP_SYS_ADMIN and the mount calls, the runtime directory writable.
func TestUnitExposure(t *testing.T) {
	need(t, "systemd-analyze")
	unit := filepath.Join(t.TempDir(), "qcryptd.service")
	if err := os.WriteFile(unit, []byte(Unit), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("systemd-analyze", "security", "--offline=yes", unit).CombinedOutput()
	if err != nil {
		t.Fatalf("systemd-analyze security: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`Overall exposure level for qcryptd.service: ([0-9.]+)`).FindSubmatch(out)
	if m == nil {
		t.Fatalf("no exposure level in:\n%s", out)
	}
	level, _ := strconv.ParseFloat(string(m[1]), 64)
	t.Logf("exposure level %.1f", level)
	if level > 4.5 {
		t.Errorf("exposure level %.1f, want at most 4.5", level)
	}
	for _, want := range []string{"DevicePolicy=closed", "DeviceAllow=/dev/loop-control rw", "DeviceAllow=block-loop rw",
		"DeviceAllow=block-device-mapper rw", "DeviceAllow=/dev/mapper/control rw", "CAP_SYS_ADMIN", "@mount",
		"RuntimeDirectory=qcryptd"} {
		if !strings.Contains(Unit, want) {
			t.Errorf("unit lacks %s (luks-init needs it)", want)
		}
	}
}

func TestPolicyIsWellFormed(t *testing.T) {
	var v struct {
		Policies []struct {
			User    string `xml:"user,attr"`
			Group   string `xml:"group,attr"`
			Context string `xml:"context,attr"`
		} `xml:"policy"`
	}
	d := xml.NewDecoder(strings.NewReader(Policy))
	d.Strict = false
	if err := d.Decode(&v); err != nil {
		t.Fatal(err)
	}
	var who []string
	for _, p := range v.Policies {
		who = append(who, p.User+p.Group+p.Context)
	}
	if strings.Join(who, ",") != "root,qubes,default" {
		t.Errorf("policies for %v", who)
	}
}
