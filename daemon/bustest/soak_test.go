package bustest

import (
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/simtest"
)

// TestSoak runs QCRYPT_SOAK_CYCLES open/write/close cycles through qcryptctl and qcryptd
// on the simulator (make soak: 100); after every reopen every file written before reads
// back with its checksum. Without QCRYPT_SOAK_CYCLES it is skipped (make check runs the
// real-kernel cycles of e2e instead).
func TestSoak(t *testing.T) {
	cycles, err := strconv.Atoi(os.Getenv("QCRYPT_SOAK_CYCLES"))
	if err != nil || cycles <= 0 {
		t.Skip("QCRYPT_SOAK_CYCLES is not set (make soak)")
	}
	w := newWorld(t, "4.3", permissiveBus)
	w.writeChain("demo", demoChain)
	w.startDaemon()
	w.waitState(w.client(), "demo", "waiting", time.Minute)
	w.ctl("start", "work")
	w.waitState(w.client(), "demo", "open", time.Minute)
	if out, code := w.qcryptctl("close", "demo"); code != 0 {
		t.Fatalf("close: %s", out)
	}
	ctl := func(op string) func() {
		return func() {
			if out, code := w.qcryptctl(op, "demo"); code != 0 {
				t.Fatalf("%s: %s", op, out)
			}
		}
	}
	simtest.Cycles(t, cycles, "/mnt/demo", ctl("open"), ctl("close"), func(script string) qubes.Result { return w.sh("work", script) })
	if left := w.leftovers(); len(left) > 0 {
		t.Errorf("after the cycles: %v", left)
	}
}
