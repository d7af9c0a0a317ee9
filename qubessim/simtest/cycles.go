package simtest

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
)

// Open/write/close cycles (the simulator soak and the real-kernel cycles of e2e): in the
// open chain, cycle i checksums the files of every earlier cycle, then writes its own
// 64 KiB of random data and checksums it, in one command in the target.

// CycleBytes is what each cycle writes.
const CycleBytes = 64 << 10

// Cycles runs n cycles: openChain opens the chain, run runs a script in its target (whose
// plaintext is at dir), closeChain closes it. It fails t for any file that does not read back
// as written and logs the figures.
func Cycles(t testing.TB, n int, dir string, openChain, closeChain func(), run func(script string) qubes.Result) {
	t.Helper()
	sums := map[string]string{}
	lost := 0
	start := time.Now()
	for i := 0; i < n; i++ {
		openChain()
		res := run(cycleScript(dir, i))
		if res.ExitCode != 0 {
			t.Fatalf("cycle %d: exit %d, stderr %q", i, res.ExitCode, res.Stderr)
		}
		bad, err := checkCycle(res.Stdout, i, sums)
		if err != nil {
			t.Fatal(err)
		}
		if len(bad) > 0 {
			t.Errorf("cycle %d: %v do not read back as written", i, bad)
			lost += len(bad) * CycleBytes
		}
		closeChain()
	}
	t.Logf("cycles: %d open/write/close cycles, %d bytes written, %d lost, %.2f s per cycle",
		n, n*CycleBytes, lost, time.Since(start).Seconds()/float64(n))
}

func cycleScript(dir string, i int) string {
	return fmt.Sprintf("cd %s && { ls | grep '^cycle-' | sort | xargs -r sha256sum; } && head -c %d /dev/urandom > cycle-%04d && sync && sha256sum cycle-%04d",
		dir, CycleBytes, i, i)
}

// checkCycle reads cycle i's output: every earlier file must read back with the checksum
// recorded in sums (file name -> sha256sum line), which gets the new file's. It returns
// the files that did not.
func checkCycle(out []byte, i int, sums map[string]string) (lost []string, err error) {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != i+1 {
		return nil, fmt.Errorf("cycle %d: want %d earlier files and the new one, got %q", i, i, out)
	}
	seen := map[string]bool{}
	for _, l := range lines[:i] {
		_, name, _ := strings.Cut(l, "  ")
		seen[name] = true
		if sums[name] != l {
			lost = append(lost, name)
		}
	}
	for name := range sums {
		if !seen[name] {
			lost = append(lost, name)
		}
	}
	_, name, _ := strings.Cut(lines[i], "  ")
	if name != fmt.Sprintf("cycle-%04d", i) {
		return lost, fmt.Errorf("cycle %d: the new file's checksum line is %q", i, lines[i])
	}
	sums[name] = lines[i]
	return lost, nil
}
