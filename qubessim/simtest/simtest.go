// Package simtest starts qubes-sim worlds for tests. A test package that uses it calls
// simtest.Main from its TestMain. The fake tools and the qrexec-client run as a static
// qubes-sim binary built once per test process (Go's build cache makes that cheap);
// where no go command is at hand the test binary itself takes those roles.
package simtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim"
	"github.com/qcrypt/qcrypt/qubessim/inqube"
)

const asEnv = "QUBES_SIM_TEST_AS"

// Main dispatches the test binary's other roles, then runs the tests.
func Main(m *testing.M) {
	if tool := inqube.ToolName(os.Args[0]); tool != "" {
		os.Exit(inqube.RunTool(tool, os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
	}
	if os.Getenv(asEnv) == "qrexec-client" {
		os.Exit(qubessim.QrexecClient(os.Args[1:]))
	}
	code := m.Run()
	for _, f := range afterTests {
		if err := f(); err != nil && code == 0 {
			fmt.Fprintln(os.Stderr, "FAIL after the tests:", err)
			code = 1
		}
	}
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	for _, f := range atExit {
		f()
	}
	os.Exit(code)
}

var (
	atExit     []func()
	afterTests []func() error
)

// AfterTests registers a check of what the package's tests did, run once they passed:
// its error fails the package.
func AfterTests(f func() error) { afterTests = append(afterTests, f) }

// AtExit registers cleanup to run after all tests of the package (Main exits the
// process, so a test package that uses it has no TestMain of its own).
func AtExit(f func()) { atExit = append(atExit, f) }

var (
	buildOnce sync.Once
	binDir    string
	binPath   string
)

// binary returns the qubes-sim binary for tools and qrexec-client.
func binary(t testing.TB) string {
	buildOnce.Do(func() {
		exe, err := os.Executable()
		if err != nil {
			t.Fatal(err)
		}
		binPath = exe
		gobin, err := exec.LookPath("go")
		if err != nil {
			return
		}
		dir, err := os.MkdirTemp("", "simtest-")
		if err != nil {
			return
		}
		out := filepath.Join(dir, "qubes-sim")
		cmd := exec.Command(gobin, "build", "-o", out, "github.com/qcrypt/qcrypt/cmd/qubes-sim")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if msg, err := cmd.CombinedOutput(); err != nil {
			t.Logf("cannot build qubes-sim, the test binary stands in: %v: %s", err, msg)
			os.RemoveAll(dir)
			return
		}
		binDir, binPath = dir, out
	})
	return binPath
}

// Fixture is a running simulator with a client and a runner pointed at it.
type Fixture struct {
	*qubessim.Sim
	Client *qubes.Client
	Runner *qubes.Runner
}

// Start runs a simulator of the given dialect for the duration of the test. Tests are
// skipped where bubblewrap cannot run, unless QCRYPT_REQUIRE_SANDBOX=1 (set by make
// check) turns that into a failure.
func Start(t testing.TB, dialect qubessim.Dialect) *Fixture {
	t.Helper()
	return start(t, qubessim.Config{Dialect: dialect})
}

// StartReal runs the simulator behind the real qubesd of that release, with the demo
// world (skipped where there is no real qubesd, see RealQubesd).
func StartReal(t testing.TB, dialect qubessim.Dialect) *Fixture {
	t.Helper()
	return start(t, qubessim.Config{Dialect: dialect, RealQubesd: RealQubesd(t), Demo: true})
}

// StartRealQrexec runs the simulator (its own qubesd, the demo world) with the real
// qrexec of that release: its Runner uses the real qrexec-client, daemons and agents
// (skipped where there is no real qrexec, see RealQrexec).
func StartRealQrexec(t testing.TB, dialect qubessim.Dialect) *Fixture {
	t.Helper()
	f := start(t, qubessim.Config{Dialect: dialect, Demo: true, RealQrexec: RealQrexec(t, string(dialect))})
	f.Runner.Command = []string{f.QrexecClient()}
	return f
}

func start(t testing.TB, cfg qubessim.Config) *Fixture {
	t.Helper()
	RequireSandbox(t)
	dir := t.TempDir()
	exe := binary(t)
	cfg.Dir, cfg.ToolsBinary = dir, exe
	s, err := qubessim.Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	c := qubes.NewClient(s.Socket())
	c.SetTimeout(30 * time.Second)
	r := qubes.NewRunner([]string{filepath.Join(dir, "qrexec-client"), "--socket", s.Socket()})
	r.Timeout = 30 * time.Second
	if err := os.Symlink(exe, filepath.Join(dir, "qrexec-client")); err != nil {
		t.Fatal(err)
	}
	os.Setenv(asEnv, "qrexec-client")
	return &Fixture{Sim: s, Client: c, Runner: r}
}

// StartDemo starts a simulator with the demo world.
func StartDemo(t testing.TB, dialect qubessim.Dialect) *Fixture {
	t.Helper()
	f := Start(t, dialect)
	if err := f.SetupDemo(); err != nil {
		t.Fatal(err)
	}
	return f
}

// Sh runs a script as root in vm and fails the test on a transport error.
func (f *Fixture) Sh(t testing.TB, vm, script string) qubes.Result {
	t.Helper()
	res, err := f.Runner.Run(context.Background(), vm, script, nil)
	if err != nil {
		t.Fatalf("run in %s: %v (stderr %q)", vm, err, res.Stderr)
	}
	return res
}

// sandboxWorks is asked once, by whichever of the (parallel) tests comes first.
var sandboxWorks = sync.OnceValue(func() bool {
	return exec.Command("bwrap", "--ro-bind", "/", "/", "--unshare-all", "--unshare-user", "--uid", "0", "true").Run() == nil
})

// RequireSandbox skips (or fails, under make check) when bwrap cannot create a sandbox.
func RequireSandbox(t testing.TB) {
	t.Helper()
	if sandboxWorks() {
		return
	}
	if os.Getenv("QCRYPT_REQUIRE_SANDBOX") == "1" {
		t.Fatal("bubblewrap cannot create a sandbox here (apt-get install bubblewrap; needs user namespaces or root)")
	}
	t.Skip("bubblewrap cannot create a sandbox here")
}

// RealQubesdEnv names the folder of the real qubesd test equipment (start.sh); without
// it the tests look for ../shared/real-qubesd beside the checkout.
const RealQubesdEnv = "QCRYPT_REAL_QUBESD"

// RequireRealQubesdEnv set to 1 (by CI) turns a missing real qubesd into a failure.
const RequireRealQubesdEnv = "QCRYPT_REQUIRE_REAL_QUBESD"

var (
	realOnce sync.Once
	realDir  string
	realWhy  string
)

// RealQubesd returns the folder holding the real qubesd's start.sh, or skips the test
// with a one-line reason (fails it under QCRYPT_REQUIRE_REAL_QUBESD=1).
func RealQubesd(t testing.TB) string {
	t.Helper()
	realOnce.Do(func() { realDir, realWhy = findRealQubesd() })
	if realWhy == "" {
		return realDir
	}
	if os.Getenv(RequireRealQubesdEnv) == "1" {
		t.Fatalf("the real qubesd is required: %s", realWhy)
	}
	t.Skipf("no real qubesd: %s", realWhy)
	return ""
}

func findRealQubesd() (dir, why string) {
	dir, err := equipment(RealQubesdEnv, "real-qubesd")
	if err != nil {
		return "", err.Error()
	}
	if _, err := os.Stat(filepath.Join(dir, "start.sh")); err != nil {
		return "", fmt.Sprintf("%s/start.sh is missing (set %s)", dir, RealQubesdEnv)
	}
	if err := exec.Command("/usr/bin/python3", "-c", "import lxml, libvirt, libvirtaio, jinja2, docutils, yaml, pyinotify").Run(); err != nil {
		return "", "its Python packages are missing (make deps)"
	}
	return dir, ""
}
