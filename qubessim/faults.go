// Faults: how tests and demos make the simulated qubesd, qrexec and kernels misbehave.

package qubessim

import (
	"fmt"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/control"
	"github.com/qcrypt/qcrypt/qubessim/kernelcall"
)

// fired records that a fault fired, for WaitFault. w.mu not held.
func (w *World) fired(what string) {
	select {
	case w.firedCh <- what:
	default: // nobody is waiting for hundreds of them
	}
}

// WaitFault waits until a fault fires (or timeout) and says which.
func (w *World) WaitFault(timeout time.Duration) (string, error) {
	select {
	case what := <-w.firedCh:
		return what, nil
	case <-time.After(timeout):
		return "", fmt.Errorf("no fault fired within %v", timeout)
	}
}

// Release lets every held call go on.
func (w *World) Release() {
	w.mu.Lock()
	defer w.mu.Unlock()
	close(w.release)
	w.release = make(chan struct{})
}

// AddKernelFault installs a one-shot block operation fault.
func (w *World) AddKernelFault(f control.KernelFault) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.kfaults = append(w.kfaults, f)
}

// takeKernelFault removes and returns the fault for op in vm, if any. w.mu held.
func (w *World) takeKernelFault(vm string, op kernelcall.Op) (control.KernelFault, bool) {
	for i, f := range w.kfaults {
		if f.VM == vm && f.Op == op {
			w.kfaults = append(w.kfaults[:i], w.kfaults[i+1:]...)
			return f, true
		}
	}
	return control.KernelFault{}, false
}

// RestartQubesd is what the simulator's own qubesd does on a restart: every event
// stream and every call still held ends without an answer; new calls are served.
func (w *World) RestartQubesd() {
	w.mu.Lock()
	w.restarts++
	close(w.release)
	w.release = make(chan struct{})
	for s := range w.subs {
		w.dropSubscriber(s)
	}
	w.mu.Unlock()
}

// AddFault installs a call fault.
func (w *World) AddFault(f control.Fault) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.faults = append(w.faults, &f)
}

// SetLatency makes every later Admin API call (but the event stream) wait admin and
// every stand-in qrexec call wait qrexec before it is served: on this machine the
// simulator's calls cost CPU, on a real one they cost mostly latency (about 3 ms and
// 100 ms), which hides what an operation does in parallel. Zero ends it.
func (w *World) SetLatency(admin, qrexec time.Duration) {
	w.mu.Lock()
	w.adminLatency, w.qrexecLatency = admin, qrexec
	w.mu.Unlock()
}

// SetQrexecFault installs (or, with a zero value, removes) a qrexec fault for a qube.
func (w *World) SetQrexecFault(vm string, f control.QrexecFault) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if f == (control.QrexecFault{}) {
		delete(w.qrexec, vm)
	} else {
		w.qrexec[vm] = f
	}
}

// ClearFaults removes all call, qrexec and kernel faults, forgets the ones that fired,
// lets held calls go on and un-wedges qubesd.
func (w *World) ClearFaults() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.faults = nil
	w.qrexec = map[string]control.QrexecFault{}
	w.kfaults = nil
	w.wedged = false
	close(w.release)
	w.release = make(chan struct{})
	for len(w.firedCh) > 0 {
		<-w.firedCh // what fired before is forgotten with the faults
	}
}

// SetDescription makes a backend report desc for one of its devices (hostile qube).
func (w *World) SetDescription(dev qubes.DeviceRef, desc string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.descs[dev] = desc
}

func (w *World) takeFault(method, dest string) *control.Fault {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i, f := range w.faults {
		if f.Method != method || f.Dest != "" && f.Dest != dest {
			continue
		}
		if f.Count > 0 {
			f.Count--
			if f.Count == 0 {
				w.faults = append(w.faults[:i], w.faults[i+1:]...)
			}
		}
		c := *f
		return &c
	}
	return nil
}
