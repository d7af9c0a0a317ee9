// Package system_test is the installed-stack test (make system-test): qcrypt's RPM
// installed with rpm in a qemu guest whose PID 1 is the real systemd and whose system bus
// is dbus-broker (../shared/real-systemd, test equipment), exercised through the shipped
// unit, policy, activation file and autostart entry. The guest side is guest/main.sh
// and its scenarios; this side builds what the guest gets, boots it and reads what it
// reports, and checks the journal of the guest's shutdown.
package system_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// root is the repository's top directory.
var root, _ = filepath.Abs("../..")

// realSystemd finds ../shared/real-systemd/run.sh (QCRYPT_REAL_SYSTEMD: its folder).
// Missing, the test is skipped with one line, or fails under
// QCRYPT_REQUIRE_REAL_SYSTEMD=1 (CI).
func realSystemd(t *testing.T) string {
	t.Helper()
	if os.Getenv("QCRYPT_SYSTEM_TEST") != "1" {
		t.Skip("the installed-stack test runs with make system-test (QCRYPT_SYSTEM_TEST=1)")
	}
	dir := os.Getenv("QCRYPT_REAL_SYSTEMD")
	if dir == "" {
		dir = filepath.Join(root, "..", "shared", "real-systemd")
	}
	why := ""
	switch {
	case os.Geteuid() != 0:
		why = "needs root (qemu exports the host's /)"
	case !exists(filepath.Join(dir, "run.sh")):
		why = dir + "/run.sh is missing"
	default:
		for _, tool := range []string{"qemu-system-x86_64", "rpmbuild", "busybox"} {
			if _, err := exec.LookPath(tool); err != nil {
				why = tool + " is missing (make deps)"
			}
		}
	}
	if why != "" {
		if os.Getenv("QCRYPT_REQUIRE_REAL_SYSTEMD") == "1" {
			t.Fatalf("the real systemd is required: %s", why)
		}
		t.Skip("the installed-stack test needs the real systemd: " + why)
	}
	return filepath.Join(dir, "run.sh")
}

func exists(p string) bool { _, err := os.Stat(p); return err == nil }

// run runs a command in the repository, failing the test with its output.
func run(t *testing.T, env []string, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), env...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// TestInstalledStack boots the guest once: install, the scenarios in order, and the
// system's shutdown at the end.
func TestInstalledStack(t *testing.T) {
	runSh := realSystemd(t)
	work := t.TempDir()
	stage := filepath.Join(work, "stage")
	start := time.Now()
	// Two builds of this tree: the second sorts as newer, for rpm -U.
	for dir, release := range map[string]string{"rpm-old": "0.1.systemtest", "rpm-new": "0.2.systemtest"} {
		run(t, nil, "make", "--no-print-directory", "rpm", "RPMDIR="+filepath.Join(work, dir), "RPM_RELEASE="+release)
		rpms, _ := filepath.Glob(filepath.Join(work, dir, "RPMS", "*", "qcrypt-*.rpm"))
		if len(rpms) != 1 {
			t.Fatalf("make rpm made %v", rpms)
		}
		if err := os.MkdirAll(filepath.Join(stage, dir), 0o755); err != nil {
			t.Fatal(err)
		}
		run(t, nil, "cp", rpms[0], filepath.Join(stage, dir))
	}
	run(t, []string{"CGO_ENABLED=0"}, "go", "build", "-trimpath", "-o", filepath.Join(stage, "qubes-sim"), "./cmd/qubes-sim")
	run(t, nil, "cp", "-a", "e2e/system/guest/.", stage)
	t.Logf("built the packages and the simulator in %.1f s", time.Since(start).Seconds())

	out := filepath.Join(work, "out")
	if keep := os.Getenv("SYSTEM_TEST_OUT"); keep != "" {
		out = keep // kept for a look afterwards
	}
	args := []string{"--timeout", "1500", "--mem", "3072", "--out", out}
	if s := os.Getenv("SYSTEM_TEST_SCENARIOS"); s != "" {
		args = append(args, "-e", "SCENARIOS="+s)
	}
	args = append(args, filepath.Join(stage, "main.sh"))
	for _, f := range []string{"lib.sh", "scenarios", "units", "qubes-sim", "rpm-old", "rpm-new"} {
		args = append(args, filepath.Join(stage, f))
	}
	cmd := exec.Command(runSh, args...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	booted := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	report := readReport(t, stdout)
	err = cmd.Wait()
	t.Logf("the guest ran %.1f s in all (boot, %d checks, shutdown)", time.Since(booted).Seconds(), report.checks)
	if err != nil || report.failed > 0 || report.checks == 0 {
		journal, _ := os.ReadFile(filepath.Join(out, "journal.txt"))
		t.Errorf("the guest: %v, %d of %d checks failed; the end of its journal:\n%s\nqcryptd's log with its fields:\n%s",
			err, report.failed, report.checks, tail(journal, 30000), tail(qcryptdLog(filepath.Join(out, "work", "qcryptd.json")), 60000))
	}
	if s := os.Getenv("SYSTEM_TEST_SCENARIOS"); s == "" || slices.Contains(strings.Fields(s), "12") {
		checkShutdown(t, filepath.Join(out, "work", "shutdown.json"))
	}
}

// report is what the guest said: its TAP lines, as they come.
type report struct{ checks, failed int }

func readReport(t *testing.T, r io.Reader) report {
	var rep report
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	var failing []string
	flush := func() {
		if len(failing) > 0 {
			t.Error(strings.Join(failing, "\n"))
			failing = nil
		}
	}
	for sc.Scan() {
		line := sc.Text()
		fmt.Println(line) // the guest's progress, as it comes
		switch {
		case strings.HasPrefix(line, "ok "):
			flush()
			rep.checks++
		case strings.HasPrefix(line, "not ok "):
			flush()
			rep.checks++
			rep.failed++
			failing = []string{line}
		case strings.HasPrefix(line, "#") && len(failing) > 0:
			failing = append(failing, line)
		}
	}
	flush()
	return rep
}

// qcryptdLog renders qcryptd's journal (journalctl -o json) with the fields qcryptd
// logs, which the guest's short journal leaves out.
func qcryptdLog(path string) []byte {
	data, err := os.ReadFile(path)
	if err != nil {
		return []byte(err.Error())
	}
	var b strings.Builder
	for _, line := range strings.Split(string(data), "\n") {
		var raw map[string]any
		if json.Unmarshal([]byte(line), &raw) != nil {
			continue
		}
		fmt.Fprint(&b, raw["MESSAGE"])
		for _, k := range []string{"CHAIN", "VM", "LAYER", "OP", "JOB", "STATE", "PREVIOUS", "CAUSE", "REASON", "DECISION", "ERROR"} {
			if v, ok := raw[k].(string); ok {
				fmt.Fprintf(&b, " %s=%q", strings.ToLower(k), v)
			}
		}
		b.WriteString("\n")
	}
	return []byte(b.String())
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// entry is one journal record of the shutdown capture (journalctl -o json).
type entry struct {
	Message, Identifier, Chain, State, Cause string
}

// checkShutdown reads the journal of the guest's power-off: qcryptd closes every open
// chain before it exits, each close ending closed, and only then the qubes go down, none
// while another qube still has one of its devices (a layer taken from under a mounted
// one).
func checkShutdown(t *testing.T, path string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Errorf("no journal of the shutdown: %v", err)
		return
	}
	defer f.Close()
	var entries []entry
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var raw map[string]any
		if json.Unmarshal(sc.Bytes(), &raw) != nil {
			continue
		}
		field := func(k string) string { s, _ := raw[k].(string); return s }
		entries = append(entries, entry{Message: field("MESSAGE"), Identifier: field("SYSLOG_IDENTIFIER"),
			Chain: field("CHAIN"), State: field("STATE"), Cause: field("CAUSE")})
	}
	find := func(from int, ok func(entry) bool) int {
		for i := from; i < len(entries); i++ {
			if ok(entries[i]) {
				return i
			}
		}
		return -1
	}
	qcryptd := func(msg string) func(entry) bool {
		return func(e entry) bool { return e.Identifier == "qcryptd" && strings.HasPrefix(e.Message, msg) }
	}
	begin := find(0, qcryptd("the system is shutting down"))
	stopped := find(max(begin, 0), func(e entry) bool { return e.Identifier == "qcryptd" && e.Message == "stopped" })
	if begin < 0 || stopped < 0 {
		t.Errorf("qcryptd did not say it closes for a shutdown, and then stopped (%d entries)", len(entries))
		return
	}
	for _, chain := range []string{"vault", "spare@work"} {
		closing := find(begin, func(e entry) bool { return e.Chain == chain && e.State == "closing" && e.Cause == "system-shutdown" })
		closed := find(max(closing, 0), func(e entry) bool { return e.Chain == chain && e.State == "closed" })
		if closing < 0 || closed < 0 || closed > stopped {
			t.Errorf("%s: closing for the shutdown at %d, closed at %d, qcryptd stopped at %d", chain, closing, closed, stopped)
		}
	}
	down := find(stopped, func(e entry) bool { return strings.HasPrefix(e.Message, "qubes-sim: work shut down") })
	if down < 0 {
		t.Errorf("the simulator did not shut work down after qcryptd stopped")
	}
	if i := find(0, func(e entry) bool { return strings.Contains(e.Message, "a layer taken from under") }); i >= 0 {
		t.Errorf("the shutdown took a layer from under a running qube: %s", entries[i].Message)
	}
	t.Logf("the shutdown: qcryptd closed both chains in %d journal entries before it stopped; the qubes went down after it", stopped-begin)
}
