package bustest

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

// The fault matrix: for every step of the demo chain's open and close, taken from the
// plans (a new step is covered without a new test), each fault is injected while that
// step's own call is in progress, held by the simulator until the fault is in place:
//
//   - qcryptd: qcryptd is SIGKILLed, the call goes on, qcryptd is started again;
//   - qube: the qube of the step is killed, then the call goes on;
//   - qubesd: qubesd restarts (held Admin API calls end unanswered, event streams drop);
//   - call: the step's Admin API call fails, or its command in the qube hangs past
//     qcryptd's --command-timeout.
//
// Afterwards, once qcryptd has settled: its State matches the live world, nothing is left
// that the chain does not own, and after the user's remedy (start the qubes again, close
// what is degraded, open) the data written before the fault reads back. The outcome of
// every case is logged as a table (go test -v -run TestFaultMatrix).

// faultStep is a step of a plan and the call that does it: an Admin API method to the
// step's qube, or a block operation of the fake tools in it.
type faultStep struct {
	op     string // open, close
	step   chains.Step
	method string // Admin API method, or ""
	kernel string // kernel op in step.VM, or ""
}

// matrixSteps lists the steps of the demo chain's open (mediator halted, as after a
// reset) and close, each with its call.
func matrixSteps(t *testing.T, file string) []faultStep {
	c, errs := chains.LoadFile(file, false)
	if len(errs) > 0 {
		t.Fatal(errs)
	}
	var out []faultStep
	add := func(op string, p chains.Plan) {
		for _, s := range p {
			fs := faultStep{op: op, step: s}
			switch s.Kind {
			case "start":
				fs.method = "admin.vm.Start"
			case "attach":
				fs.method = "admin.vm.device.block.Attach"
			case "detach":
				fs.method = "admin.vm.device.block.Detach"
			case "source":
				fs.kernel = "loop-setup"
			case "decrypt":
				fs.kernel = "crypt-open"
			case "close":
				fs.kernel = "crypt-close"
			case "loop-detach":
				fs.kernel = "loop-detach"
			default:
				t.Fatalf("step kind %q has no call in the fault matrix: add it", s.Kind)
			}
			out = append(out, fs)
		}
	}
	add("open", chains.PlanOpen(c, chains.OpenOptions{}))
	add("close", chains.PlanClose(c, chains.CloseOptions{}))
	return out
}

var faultKinds = []string{"qcryptd", "qube", "qubesd", "call"}

func TestFaultMatrix(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("the fault matrix takes minutes")
	}
	var table []string
	for _, kind := range faultKinds {
		t.Run(kind, func(t *testing.T) {
			w := newWorld(t, "4.3", permissiveBus)
			// Long enough that no command of this chain reaches it on a machine twice as
			// loaded (they take well under a second here); only the held ones do.
			w.daemonArgs = []string{"--command-timeout", "8s"}
			w.writeChain("demo", demoChain)
			if err := w.qubes.Start(bg, "work"); err != nil {
				t.Fatal(err)
			}
			w.startDaemon()
			c := w.client()
			w.waitState(c, "demo", "open", time.Minute)
			w.sh("work", "echo before-the-faults > /mnt/demo/marker")
			for i, fs := range matrixSteps(t, filepath.Join(w.conf, "demo", "demo.ini")) {
				var outcome string
				t.Run(fmt.Sprintf("%02d_%s_%s_%s", i+1, fs.op, fs.step.Kind, fs.step.VM), func(t *testing.T) {
					outcome = w.faultCase(t, kind, fs)
				})
				table = append(table, fmt.Sprintf("| %-8s | %-28s | %s |", kind, fs.op+": "+fs.step.Kind+" "+fs.step.VM, outcome))
			}
		})
	}
	t.Logf("fault matrix:\n| fault    | step                         | outcome |\n|---|---|---|\n%s", strings.Join(table, "\n"))
}

// faultCase runs one case on a world whose chain is open with the marker written, and
// leaves it open again. It returns what happened.
func (w *world) faultCase(t *testing.T, kind string, fs faultStep) string {
	// The world before the step: for an open, work and mediator halted (the open starts
	// mediator and is triggered by work's start); for a close, the chain open.
	var closeCmd *exec.Cmd
	if fs.op == "open" {
		w.ctl("shutdown", "work")
		w.ctl("shutdown", "mediator")
		w.settle(t)
	}
	fault := "hold"
	if kind == "call" {
		fault = "fail"
	}
	if fs.method != "" {
		if fault == "fail" {
			w.ctl("fault", fs.method, "exception", "QubesException", "injected", fs.step.VM)
		} else {
			w.ctl("fault", fs.method, "hold", fs.step.VM)
		}
	} else {
		mode := "hang" // kind call: never released, past --command-timeout
		w.ctl("kernel-fault", fs.step.VM, fs.kernel, mode)
	}
	if fs.op == "open" {
		w.ctl("start", "work")
	} else {
		closeCmd = exec.Command(bin(t, "qcryptctl"), "close", "demo")
		closeCmd.Env = append(closeCmd.Environ(), "DBUS_SYSTEM_BUS_ADDRESS="+w.busAddr)
		if err := closeCmd.Start(); err != nil {
			t.Fatal(err)
		}
	}
	if fired := strings.TrimSpace(w.ctl("wait-fault")); fired == "" {
		t.Fatal("the fault did not fire")
	}
	switch kind {
	case "qcryptd":
		w.daemon.Process.Signal(syscall.SIGKILL)
		_ = w.daemon.Wait() // ended by a signal we sent; its status is not the point
		w.ctl("release")
		w.startDaemon()
		w.reconciled(t)
	case "qube":
		// A qube being started is not running yet: nothing to kill (then it starts).
		w.simctl("kill", fs.step.VM)
		w.ctl("release")
	case "qubesd":
		reconnected := w.expectReconnect(w.client())
		w.ctl("restart-qubesd")
		w.ctl("release")
		reconnected(time.Minute)
	}
	if closeCmd != nil {
		_ = closeCmd.Wait() // a close under a fault may fail; the checks below judge the end
	}
	if kind == "call" {
		w.settle(t) // the failed call or the command timeout ends the step
	}
	w.ctl("clear-faults")
	ci := w.settle(t)
	outcome := string(ci.State)
	if ci.Waiting != "" {
		outcome += " (" + ci.Waiting + ")"
	}
	w.checkConsistent(t, ci)
	if fs.op == "close" && ci.State == "open" {
		t.Error("the user's close ended with the chain open")
	}
	// The user's remedy, then the data.
	remedy := w.remedy(t, ci)
	if remedy != "" {
		outcome += "; " + remedy
	}
	if got := strings.TrimSpace(string(w.sh("work", "cat /mnt/demo/marker").Stdout)); got != "before-the-faults" {
		t.Errorf("marker after reopen: %q", got)
	}
	return outcome
}

// settle waits until qcryptd has no job for the chain and shows a resting state.
func (w *world) settle(t *testing.T) dbusapi.ChainInfo {
	t.Helper()
	var ci dbusapi.ChainInfo
	testkit.Eventually(w.t, "the chain settles", 2*time.Minute, func() bool {
		c, err := dbusapi.ConnectAt(w.busAddr)
		if err != nil {
			return false
		}
		defer c.Disconnect()
		jobs, err := c.Jobs(bg)
		if err != nil {
			return false
		}
		for _, j := range jobs {
			if j.Chain == "demo" && (j.State == "running" || j.State == "queued") {
				return false
			}
		}
		ci, err = c.Chain(bg, "demo")
		return err == nil && ci.State != "opening" && ci.State != "closing"
	})
	return ci
}

// reconciled waits until a freshly started qcryptd has reconciled the chain (until
// then it shows the chain as closed).
func (w *world) reconciled(t *testing.T) {
	t.Helper()
	testkit.Eventually(w.t, "qcryptd reconciled the chain", 2*time.Minute, func() bool {
		c, err := dbusapi.ConnectAt(w.busAddr)
		if err != nil {
			return false
		}
		defer c.Disconnect()
		jobs, _ := c.Jobs(bg)
		for _, j := range jobs {
			if j.Chain == "demo" && j.Operation == "reconcile" && j.State != "running" && j.State != "queued" {
				return true
			}
		}
		return false
	})
}

// checkConsistent holds qcryptd's state against the live world: open is complete,
// closed/waiting/failed leave nothing of the chain, degraded is neither.
func (w *world) checkConsistent(t *testing.T, ci dbusapi.ChainInfo) {
	t.Helper()
	c, err := dbusapi.ConnectAt(w.busAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect()
	st, err := c.Status(bg, "demo")
	if err != nil {
		t.Fatalf("status: %v", err)
	}
	left := w.leftovers()
	switch ci.State {
	case "open":
		if !st.Open() {
			t.Errorf("qcryptd says open, the world %+v", st)
		}
	case "closed", "waiting", "failed":
		if len(left) > 0 {
			t.Errorf("qcryptd says %s, the world has %v", ci.State, left)
		}
	case "degraded":
		if st.Open() || len(left) == 0 {
			t.Errorf("qcryptd says degraded, the world %+v %v", st, left)
		}
	default:
		t.Errorf("unexpected state %s", ci.State)
	}
}

// leftovers lists loops, mappers, mounts and attachments in the running demo qubes.
func (w *world) leftovers() []string {
	var out []string
	for _, vm := range []string{"sys-usb", "mediator", "work"} {
		if st, _ := w.qubes.CurrentState(bg, vm); st != "Running" {
			continue
		}
		for _, l := range strings.Fields(string(w.sh(vm, "losetup -a | cut -d: -f1; ls /dev/mapper; grep -o ' /mnt/demo ' /proc/mounts").Stdout)) {
			out = append(out, vm+":"+l)
		}
		atts, _ := w.qubes.Attached(bg, vm)
		for _, a := range atts {
			out = append(out, vm+"<-"+a.DeviceRef.String())
		}
	}
	sort.Strings(out)
	return out
}

// remedy brings the chain back to open as a user would, and says what it took.
func (w *world) remedy(t *testing.T, ci dbusapi.ChainInfo) string {
	t.Helper()
	var did []string
	if ci.State == "degraded" {
		w.qcryptctl("close", "demo")
		did = append(did, "close")
		ci = w.settle(t)
	}
	if vm, ok := strings.CutPrefix(ci.Waiting, "waiting for "); ci.State == "waiting" && ok {
		w.ctl("start", vm) // its chain opens
		did = append(did, "start "+vm)
	} else if ci.State != "open" {
		if out, code := w.qcryptctl("open", "demo"); code != 0 {
			// A qube keeps a stale device (Qubes #4784) or is down: restart the chain's qubes.
			did = append(did, "open refused: "+firstLine(out))
			for _, vm := range []string{"work", "mediator", "sys-usb"} {
				w.simctl("shutdown", vm) // those that run
			}
			w.settle(t)
			w.ctl("start", "sys-usb")
			w.ctl("start", "work")
			did = append(did, "qubes restarted")
		} else {
			did = append(did, "open")
		}
	}
	w.waitState(w.client(), "demo", "open", 2*time.Minute)
	return strings.Join(did, ", ")
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return strings.TrimPrefix(s, "qcryptctl: ")
}

// simctl is ctl for a call that may fail; it returns the output.
func (w *world) simctl(args ...string) string {
	out, _ := exec.Command(bin(w.t, "qubes-sim"), append([]string{"ctl", "--socket", w.socket}, args...)...).CombinedOutput()
	return string(out)
}
