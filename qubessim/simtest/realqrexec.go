package simtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/qubessim"
)

// RealQrexecEnv names the folder of the real qrexec test equipment (build.sh,
// start-vm.sh); without it the tests look for ../shared/real-qrexec beside the checkout.
const RealQrexecEnv = "QCRYPT_REAL_QREXEC"

// RequireRealQrexecEnv set to 1 (by CI) turns a missing real qrexec into a failure.
const RequireRealQrexecEnv = "QCRYPT_REQUIRE_REAL_QREXEC"

// CacheEnv names where test equipment is built once and reused (default: the user's
// cache directory, qcrypt/; see qubessim.BuildRealQrexec).
const CacheEnv = "QCRYPT_CACHE"

var (
	qrexecMu    sync.Mutex
	qrexecBuilt = map[string]string{} // version → build, or "!reason"
)

// RealQrexec returns a build of the real Qubes qrexec of a release ("4.2" or "4.3"),
// made by ../shared/real-qrexec/build.sh into the cache directory once and reused
// while its sources are the same. It skips the test with a one-line reason when the
// equipment is absent (fails it under QCRYPT_REQUIRE_REAL_QREXEC=1).
func RealQrexec(t testing.TB, version string) string {
	t.Helper()
	qrexecMu.Lock()
	out, ok := qrexecBuilt[version]
	if !ok {
		out = buildRealQrexec(version)
		qrexecBuilt[version] = out
	}
	qrexecMu.Unlock()
	why, failed := strings.CutPrefix(out, "!")
	switch {
	case !failed:
		return out
	case os.Getenv(RequireRealQrexecEnv) == "1":
		t.Fatalf("the real qrexec is required: %s", why)
	default:
		t.Skipf("no real qrexec: %s", why)
	}
	return ""
}

func buildRealQrexec(version string) string {
	src, err := equipment(RealQrexecEnv, "real-qrexec")
	if err != nil {
		return "!" + err.Error()
	}
	out, err := qubessim.BuildRealQrexec(src, os.Getenv(CacheEnv), version)
	if err != nil {
		return "!" + err.Error()
	}
	return out
}

// equipment is the folder of a piece of test equipment: $env, or ../shared/name beside
// the module root.
func equipment(env, name string) (string, error) {
	if dir := os.Getenv(env); dir != "" {
		return dir, nil
	}
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := wd; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return filepath.Join(filepath.Dir(d), "shared", name), nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("cannot find the module root")
		}
	}
}

// QrexecVM is one qube of the real qrexec: the real qrexec-agent in a bubblewrap
// sandbox and dom0's real qrexec-daemon for it (start-vm.sh).
type QrexecVM struct {
	Name   string
	Client string // a qrexec-client with the real one's command line, for this run dir
	runDir string
	sup    *exec.Cmd
	done   chan struct{}
}

// StartQrexecVM starts qube name (domain id domid) of the real qrexec build out, with
// its sockets in runDir; it is stopped when the test ends.
func StartQrexecVM(t testing.TB, out, runDir, name string, domid int) *QrexecVM {
	t.Helper()
	// qrexec-daemon 4.2 cuts its socket's path at 39 bytes (char socket_address[40]) and
	// then binds whatever that names: a directory of a long path fails "address in use".
	if sock := fmt.Sprintf("%s/qubes/qrexec.%d", runDir, domid); len(sock) > 39 {
		t.Fatalf("run directory %s is too long for qrexec-daemon 4.2's socket path (%s: at most 39 bytes)", runDir, sock)
	}
	src, err := equipment(RealQrexecEnv, "real-qrexec")
	if err != nil {
		t.Fatal(err)
	}
	client := filepath.Join(runDir, "qrexec-client")
	wrapper := fmt.Sprintf("#!/bin/sh\nQREXEC_RUN_DIR=%s exec %s \"$@\"\n", runDir, filepath.Join(out, "bin", "qrexec-client"))
	if err := os.WriteFile(client, []byte(wrapper), 0o755); err != nil {
		t.Fatal(err)
	}
	log, err := os.Create(filepath.Join(runDir, "start-vm."+name+".log"))
	if err != nil {
		t.Fatal(err)
	}
	sup := exec.Command(filepath.Join(src, "start-vm.sh"), out, name, fmt.Sprint(domid))
	sup.Env = append(os.Environ(), "QREXEC_RUN_DIR="+runDir)
	sup.Stdout, sup.Stderr = log, log
	if err := sup.Start(); err != nil {
		t.Fatal(err)
	}
	vm := &QrexecVM{Name: name, Client: client, runDir: runDir, sup: sup, done: make(chan struct{})}
	go func() { _ = sup.Wait(); log.Close(); close(vm.done) }() // Stop kills it
	t.Cleanup(vm.Stop)
	sock := filepath.Join(runDir, "qubes", "qrexec."+name)
	deadline := time.Now().Add(time.Minute)
	for {
		if _, err := os.Stat(sock); err == nil {
			return vm
		}
		select {
		case <-vm.done:
			b, _ := os.ReadFile(log.Name())
			daemon, _ := os.ReadFile(filepath.Join(runDir, "log", "daemon."+name+".log"))
			agent, _ := os.ReadFile(filepath.Join(runDir, "log", "agent."+name+".log"))
			t.Fatalf("start-vm.sh %s ended: %s\nits qrexec-daemon: %s\nits qrexec-agent: %s", name, b, daemon, agent)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("qrexec-daemon of %s did not come up in a minute", name)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// agentPid is the process id of the qube's sandbox (bwrap), the first of the two its
// pids file holds (the second is its qrexec-daemon's).
func (vm *QrexecVM) agentPid() int {
	b, err := os.ReadFile(filepath.Join(vm.runDir, "log", "pids."+vm.Name))
	if err != nil {
		return 0
	}
	var agent int
	if _, err := fmt.Sscan(string(b), &agent); err != nil {
		return 0
	}
	return agent
}

// Crash kills the whole sandbox at once, as a qube that crashes (killing only the
// agent would not end calls in progress).
func (vm *QrexecVM) Crash() {
	if agent := vm.agentPid(); agent > 0 {
		syscall.Kill(agent, syscall.SIGKILL)
	}
}

// Freeze stops every process of the qube (a hung qube).
func (vm *QrexecVM) Freeze() { vm.signalSandbox(syscall.SIGSTOP) }

// Thaw lets a frozen qube's processes go on.
func (vm *QrexecVM) Thaw() { vm.signalSandbox(syscall.SIGCONT) }

func (vm *QrexecVM) signalSandbox(sig syscall.Signal) {
	agent := vm.agentPid()
	if agent <= 0 {
		return
	}
	var tree func(pid int)
	tree = func(pid int) {
		syscall.Kill(pid, sig)
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
		for _, c := range strings.Fields(string(b)) {
			var child int
			if _, err := fmt.Sscan(c, &child); err != nil {
				continue
			}
			tree(child)
		}
	}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", agent, agent))
	for _, c := range strings.Fields(string(b)) {
		var child int
		if _, err := fmt.Sscan(c, &child); err != nil {
			continue
		}
		tree(child)
	}
}

// Stop ends the qube and its daemon and waits for them.
func (vm *QrexecVM) Stop() {
	if vm.sup.Process != nil {
		vm.sup.Process.Signal(syscall.SIGTERM)
	}
	<-vm.done
}
