package qubessim

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/control"
	"github.com/qcrypt/qcrypt/qubessim/inqube"
)

// With the real qrexec (a build of ../shared/real-qrexec: Qubes' qrexec-client,
// qrexec-daemon and qrexec-agent over a socket vchan), every running qube has dom0's
// real qrexec-daemon and the real qrexec-agent in a sandbox of its own, started with
// the qube and killed with it. Callers use the qrexec-client the simulator writes
// (QrexecClientPath): the real one, run after the simulator has made what qubesd did
// (a start) reach the qubes, as Xen does before qubesd answers.
//
// The qube's qubes.VMShell service hands its stdio and exit status to the qube's own
// sandbox (fake block tools, or the kernel backend's namespaces), where the script runs
// exactly as a stand-in call would; everything from qrexec-client to the service's
// stdio and exit status is the real qrexec.

// Paths inside an agent's sandbox.
const (
	agentDir = "/run/qubes-agent"
	// The directory of the simulator's control socket (the socket may not exist yet
	// when the demo world starts its qubes).
	agentControlDir = "/run/qubes-sim/ctl"
)

type realQrexec struct {
	build   string // build.sh's OUT
	dir     string // run directory: vchan/, rpc/, log/, the qrexec-client
	sockets string // the daemons' sockets (short: see newRealQrexec)
	tools   string // the simulator's tools directory (its binary)
	bwrap   string
	control string // the control socket; its directory is bound read-only into every agent sandbox
	uuid    bool   // the daemon takes --uuid (4.3)
	domid   int    // the last domain id given; each boot gets a new one, as on Xen
}

// qrexecProcs are a running qube's agent sandbox and daemon.
type qrexecProcs struct {
	agent, daemon *exec.Cmd
}

func newRealQrexec(build, dir, tools, bwrap, control, simBinary string) (*realQrexec, error) {
	lib := filepath.Join(build, "prefix", "lib")
	for _, f := range []string{"qrexec-daemon", "qrexec-agent-nopam", "qrexec-client", "qubes-rpc-multiplexer"} {
		if _, err := os.Stat(filepath.Join(lib, f)); err != nil {
			return nil, fmt.Errorf("cannot use the real qrexec in %s (build it with real-qrexec/build.sh): %w", build, err)
		}
	}
	rq := &realQrexec{build: build, dir: dir, tools: tools, bwrap: bwrap, control: control}
	for _, d := range []string{"vchan", "rpc", "rpc-config", "log"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	// qrexec-daemon 4.2 cuts its socket's path at 39 bytes (char socket_address[40]):
	// in a longer directory every qube's daemon binds the same cut path and calls reach
	// the qube started last. dom0's /var/run/qubes is short; so is this.
	sockets, err := os.MkdirTemp("/tmp", "qrx")
	if err != nil {
		return nil, err
	}
	if len(sockets+"/qrexec.") > 39-5 {
		os.Remove(sockets)
		return nil, fmt.Errorf("cannot keep qrexec's socket path short: %s", sockets)
	}
	rq.sockets = sockets
	help, _ := exec.Command(filepath.Join(lib, "qrexec-daemon"), "--help").CombinedOutput()
	rq.uuid = strings.Contains(string(help), "--uuid")
	// The qrexec-client callers use: the real one, once the qube is ready for it. The
	// simulated dom0 (qcryptd --dom0-root) is reached through the stand-in: the real
	// client refuses dom0 -> dom0, and qcryptd in a real dom0 runs its work locally.
	admin := shq(strings.TrimSuffix(control, ".control"))
	client := fmt.Sprintf("#!/bin/sh\ncase \" $* \" in *' -d dom0 '*) exec %s qrexec-client --socket %s \"$@\";; esac\n"+
		"%s qrexec-ready --socket %s \"$@\"\nVCHAN_DOMAIN=0 VCHAN_SOCKET_DIR=%s exec %s --socket-dir=%s \"$@\"\n",
		shq(simBinary), admin, shq(simBinary), admin, shq(filepath.Join(dir, "vchan")),
		shq(filepath.Join(lib, "qrexec-client")), shq(sockets))
	if err := os.WriteFile(QrexecClientPath(dir), []byte(client), 0o755); err != nil {
		return nil, err
	}
	return rq, nil
}

// QrexecClientPath is the qrexec-client a simulator with the real qrexec writes into
// its run directory (Config.Dir/qrexec).
func QrexecClientPath(runDir string) string { return filepath.Join(runDir, "qrexec-client") }

// QrexecClient is the real qrexec-client of a simulator with Config.RealQrexec ("":
// none).
func (s *Sim) QrexecClient() string {
	if s.World.rq == nil {
		return ""
	}
	return QrexecClientPath(s.World.rq.dir)
}

func shq(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// start runs vm's daemon and agent and waits until qrexec-client can reach it. w.mu held.
func (rq *realQrexec) start(vm *VM) error {
	rq.domid++
	domid := rq.domid
	lib := filepath.Join(rq.build, "prefix", "lib")
	svc := filepath.Join(rq.dir, "rpc", vm.Name)
	if err := os.MkdirAll(svc, 0o755); err != nil {
		return err
	}
	// qubes.VMShell (core-agent-linux: exec /bin/bash) runs in the qube's own sandbox.
	admin := agentControlDir + "/" + strings.TrimSuffix(filepath.Base(rq.control), ".control")
	// --ready: the caller's qrexec-ready has made the qube ready for this call.
	shell := fmt.Sprintf("#!/bin/sh\nexec %s/qubes-sim qrexec-client --socket %s --ready -d %s 'root:QUBESRPC qubes.VMShell+ dom0'\n",
		inqube.ToolsDir, shq(admin), shq(vm.Name))
	if err := os.WriteFile(filepath.Join(svc, "qubes.VMShell"), []byte(shell), 0o755); err != nil {
		return err
	}
	// A killed daemon leaves its sockets: the next boot must not take them for its own.
	sock := filepath.Join(rq.sockets, "qrexec."+vm.Name)
	os.Remove(sock)
	args := []string{"--ro-bind", "/usr", "/usr"}
	dirs, links := inqube.HostSystem()
	for _, d := range dirs {
		args = append(args, "--ro-bind", "/"+d, "/"+d)
	}
	for d, target := range links {
		args = append(args, "--symlink", target, "/"+d)
	}
	// The host's /etc entry by entry, so that /etc/qubes-rpc can be the qube's own.
	args = append(args, "--tmpfs", "/etc")
	ents, _ := os.ReadDir("/etc")
	for _, e := range ents {
		p := "/etc/" + e.Name()
		switch e.Name() {
		case "qubes-rpc", "qubes", "pam.d":
			continue
		}
		if target, err := os.Readlink(p); err == nil {
			args = append(args, "--symlink", target, p)
		} else {
			args = append(args, "--ro-bind", p, p)
		}
	}
	args = append(args,
		"--ro-bind", svc, "/etc/qubes-rpc",
		"--dir", "/etc/qubes", "--ro-bind", filepath.Join(rq.dir, "rpc-config"), "/etc/qubes/rpc-config",
		"--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/run",
		"--dir", "/var", "--symlink", "../run", "/var/run", "--tmpfs", "/root", "--dir", "/home",
		"--ro-bind", filepath.Join(rq.build, "prefix"), filepath.Join(rq.build, "prefix"),
		"--ro-bind", filepath.Join(lib, "qrexec-agent-nopam"), agentDir+"/qrexec-agent",
		"--ro-bind", filepath.Join(lib, "qubes-rpc-multiplexer"), agentDir+"/qubes-rpc-multiplexer",
		"--bind", filepath.Join(rq.dir, "vchan"), "/run/vchan", "--dir", "/run/qubes",
		"--ro-bind", rq.tools, inqube.ToolsDir,
		"--ro-bind", filepath.Dir(rq.control), agentControlDir,
		// The agent built without PAM: it runs QUBESRPC services as its own user, root
		// of this user namespace (the PAM agent needs the host's root).
		"--unshare-all", "--unshare-user", "--uid", "0", "--gid", "0",
		"--hostname", vm.Name, "--die-with-parent", "--clearenv",
		"--setenv", "PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"--setenv", "VCHAN_DOMAIN", fmt.Sprint(domid),
		"--setenv", "QREXEC_MULTIPLEXER_PATH", agentDir+"/qubes-rpc-multiplexer",
		"--", agentDir+"/qrexec-agent", "--no-fork-server")
	agentLog, err := os.Create(filepath.Join(rq.dir, "log", "agent."+vm.Name+".log"))
	if err != nil {
		return err
	}
	defer agentLog.Close()
	agent := exec.Command(rq.bwrap, args...)
	agent.Stdout, agent.Stderr = agentLog, agentLog
	agent.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := agent.Start(); err != nil {
		return fmt.Errorf("cannot start the qrexec agent of %s: %w", vm.Name, err)
	}
	dargs := []string{"--socket-dir=" + rq.sockets, "--policy-program=/bin/false", "--direct"}
	if rq.uuid {
		dargs = append(dargs, "--uuid="+vm.UUID())
	}
	dargs = append(dargs, fmt.Sprint(domid), vm.Name, "root")
	daemonLog, err := os.Create(filepath.Join(rq.dir, "log", "daemon."+vm.Name+".log"))
	if err != nil {
		killGroup(agent)
		_ = agent.Wait() // killed: its status says nothing
		return err
	}
	defer daemonLog.Close()
	daemon := exec.Command(filepath.Join(lib, "qrexec-daemon"), dargs...)
	daemon.Env = append(os.Environ(), "VCHAN_DOMAIN=0", "VCHAN_SOCKET_DIR="+filepath.Join(rq.dir, "vchan"))
	daemon.Stdout, daemon.Stderr = daemonLog, daemonLog
	daemon.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := daemon.Start(); err != nil {
		killGroup(agent)
		_ = agent.Wait() // killed: its status says nothing
		return fmt.Errorf("cannot start the qrexec daemon of %s: %w", vm.Name, err)
	}
	procs := &qrexecProcs{agent: agent, daemon: daemon}
	ended := make(chan struct{})
	go func() { _ = daemon.Wait(); close(ended) }() // ProcessState tells how it ended
	go func() { _ = agent.Wait() }()
	// qubesd's start waits for the daemon to connect to the agent (qrexec_timeout).
	deadline := time.Now().Add(time.Duration(max(vm.QrexecTimeout, 10)) * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			vm.qrexec = procs
			return nil
		}
		select {
		case <-ended:
			killGroup(agent)
			return fmt.Errorf("the qrexec daemon of %s ended (see %s)", vm.Name, daemonLog.Name())
		default:
		}
		if time.Now().After(deadline) {
			rq.stop(procs)
			return fmt.Errorf("cannot connect to the qrexec agent of %s", vm.Name)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// stop kills a qube's agent sandbox (all of it, as a crash) and its daemon.
func (rq *realQrexec) stop(p *qrexecProcs) {
	if p == nil {
		return
	}
	killGroup(p.agent)
	killGroup(p.daemon)
}

// stopVM is stop for a qube that halts. w.mu held.
func (rq *realQrexec) stopVM(vm *VM) {
	rq.stop(vm.qrexec)
	vm.qrexec = nil
	os.Remove(filepath.Join(rq.sockets, "qrexec."+vm.Name))
}

// QrexecReady is the qrexec-ready command: it asks the simulator at --socket to make
// qube -d ready for the real qrexec-client, which runs next with the same arguments.
// It fails quietly: the real qrexec-client reports what is wrong.
func QrexecReady(args []string, stderr io.Writer) int {
	socket := qubes.DefaultSocket
	var vm string
	for i := 0; i+1 < len(args); i++ {
		switch args[i] {
		case "--socket":
			socket = args[i+1]
		case "-d":
			vm = args[i+1]
		}
	}
	if resp, err := control.Call(socket, control.Request{Op: control.QrexecReady, VM: vm}); err != nil || resp.Error != "" {
		fmt.Fprintf(stderr, "qubes-sim qrexec-ready: %v %s\n", err, resp.Error)
		return 1
	}
	return 0
}

// BuildRealQrexec builds the real qrexec of a release ("4.2" or "4.3") with src's
// build.sh (../shared/real-qrexec) into cache (default: the user's cache directory,
// qcrypt/) once, and returns the build; a build is named by its sources, so changed
// sources build anew. Concurrent callers (test binaries of several packages) wait for
// one build.
func BuildRealQrexec(src, cache, version string) (string, error) {
	if _, err := os.Stat(filepath.Join(src, "build.sh")); err != nil {
		return "", fmt.Errorf("%s/build.sh is missing", src)
	}
	h := sha256.New()
	fmt.Fprintln(h, version)
	files, _ := filepath.Glob(filepath.Join(src, "src", "*"))
	for _, f := range append([]string{filepath.Join(src, "build.sh")}, files...) {
		fh, err := os.Open(f)
		if err != nil {
			return "", err
		}
		_, err = io.Copy(h, fh)
		fh.Close()
		if err != nil {
			return "", err
		}
	}
	if cache == "" {
		dir, err := os.UserCacheDir()
		if err != nil {
			return "", err
		}
		cache = filepath.Join(dir, "qcrypt")
	}
	out := filepath.Join(cache, "real-qrexec-"+version+"-"+hex.EncodeToString(h.Sum(nil))[:12])
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return "", err
	}
	lock, err := os.OpenFile(out+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", err
	}
	done := filepath.Join(out, "built")
	if _, err := os.Stat(done); err == nil {
		return out, nil
	}
	cmd := exec.Command(filepath.Join(src, "build.sh"), out, version)
	cmd.Dir = cache
	if b, err := cmd.CombinedOutput(); err != nil {
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		return "", fmt.Errorf("build.sh %s failed (%w; make deps installs what it needs): %s", version, err, lines[len(lines)-1])
	}
	return out, os.WriteFile(done, nil, 0o644)
}
