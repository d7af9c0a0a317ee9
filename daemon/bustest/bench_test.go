package bustest

import (
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

// BenchmarkIdleDaemon runs qcryptd with 50 configured chains (all waiting for their
// qubes) for 10 s and reports its resident memory and CPU use.
func BenchmarkIdleDaemon(b *testing.B) {
	w := newWorld(b, "4.2", permissiveBus)
	for i := 0; i < 50; i++ {
		w.writeChain(fmt.Sprintf("c%02d", i), strings.Replace(demoChain, "key=demo", fmt.Sprintf("key=k%02d", i), 1))
	}
	d := w.startDaemon()
	c := w.client()
	w.waitState(c, "c49", "waiting", 60*time.Second)
	time.Sleep(time.Second)
	cpu0 := cpuTicks(b, d.Process.Pid)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		time.Sleep(10 * time.Second)
	}
	b.StopTimer()
	cpu := cpuTicks(b, d.Process.Pid) - cpu0
	secs := 10 * float64(b.N)
	b.ReportMetric(float64(rssKiB(b, d.Process.Pid)), "rss-KiB")
	b.ReportMetric(float64(cpu)*10/secs, "cpu-ms/s") // 100 ticks per second
}

func rssKiB(b *testing.B, pid int) int { return vmKiB(b, pid, "VmRSS:") }

func cpuTicks(b *testing.B, pid int) int {
	data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	s := string(data)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.Atoi(f[11])
	st, _ := strconv.Atoi(f[12])
	return ut + st
}

// BenchmarkOpenClose opens and closes the 2-layer demo chain through qcryptd, with the
// simulator's own qubesd and with the real one (4.2 and 4.3), and reports each.
func BenchmarkOpenClose(b *testing.B) {
	for _, dialect := range worlds {
		b.Run(dialect, func(b *testing.B) {
			w := newWorld(b, dialect, permissiveBus)
			w.writeChain("demo", demoChain)
			if err := w.qubes.Start(bg, "work"); err != nil {
				b.Fatal(err)
			}
			w.startDaemon()
			c := w.client()
			w.waitState(c, "demo", "open", time.Minute)
			if r, err := c.RunJob(bg, c.Close("demo", chains.CloseOptions{}), nil); err != nil || !r.Success {
				b.Fatalf("close: %+v %v", r, err)
			}
			var open, closed time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				t0 := time.Now()
				if r, err := c.RunJob(bg, c.Open("demo", chains.OpenOptions{}), nil); err != nil || !r.Success {
					b.Fatalf("open: %+v %v", r, err)
				}
				t1 := time.Now()
				if r, err := c.RunJob(bg, c.Close("demo", chains.CloseOptions{}), nil); err != nil || !r.Success {
					b.Fatalf("close: %+v %v", r, err)
				}
				open, closed = open+t1.Sub(t0), closed+time.Since(t1)
			}
			b.ReportMetric(float64(open.Milliseconds())/float64(b.N), "open-ms")
			b.ReportMetric(float64(closed.Milliseconds())/float64(b.N), "close-ms")
		})
	}
}

// BenchmarkFiftyChains: 50 configured chains through one sys-usb/mediator/work; work
// starts and every chain opens (qrexec calls bounded by --max-qrexec, default 4). It
// reports the time until all are open, qcryptd's peak memory, the Admin API and qrexec
// calls per chain, and qcryptd's start-up with 25 of them open (time until every chain
// is reconciled, calls).
func BenchmarkFiftyChains(b *testing.B) {
	const n = 50
	w := newWorld(b, "4.3", permissiveBus)
	if err := w.qubes.Start(bg, "mediator"); err != nil {
		b.Fatal(err)
	}
	if err := w.qubes.Start(bg, "work"); err != nil {
		b.Fatal(err)
	}
	for i := 0; i < n; i++ {
		w.sh("sys-usb", fmt.Sprintf("cp /home/user/demo.luks /home/user/c%02d.luks", i))
		for _, vm := range []string{"mediator", "work"} {
			w.sh(vm, fmt.Sprintf("cp /home/user/.qcrypt/keys/demo /home/user/.qcrypt/keys/k%02d", i))
		}
		w.writeChain(fmt.Sprintf("c%02d", i), strings.NewReplacer("key=demo", fmt.Sprintf("key=k%02d", i),
			"demo.luks", fmt.Sprintf("c%02d.luks", i), "/mnt/demo", fmt.Sprintf("/mnt/c%02d", i)).Replace(demoChain))
	}
	if err := w.qubes.Shutdown(bg, "work", false, true); err != nil {
		b.Fatal(err)
	}
	if err := w.qubes.Shutdown(bg, "mediator", false, true); err != nil {
		b.Fatal(err)
	}
	// spent logs what a phase called, per method, and returns the Admin API and qrexec totals.
	spent := func(phase string, before, after map[string]int) (admin, qrexec int) {
		var by []string
		for _, k := range slices.Sorted(maps.Keys(after)) {
			if d := after[k] - before[k]; d > 0 && k != "admin" && k != "qrexec" {
				by = append(by, fmt.Sprintf("%s=%d", k, d))
			}
		}
		b.Logf("%s: %s", phase, strings.Join(by, " "))
		return after["admin"] - before["admin"], after["qrexec"] - before["qrexec"]
	}
	allSettled := func(c *dbusapi.Client, want func(dbusapi.ChainState) bool) func() bool {
		return func() bool {
			l, err := c.Chains(bg)
			if err != nil || len(l) != n {
				return false
			}
			for _, e := range l {
				if !want(e.State) {
					return false
				}
			}
			return true
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		d := w.startDaemon()
		c := w.client()
		testkit.Eventually(w.t, "all wait", time.Minute, allSettled(c, func(s dbusapi.ChainState) bool { return s == dbusapi.ChainWaiting }))
		c0 := w.calls()
		t0 := time.Now()
		if err := w.qubes.Start(bg, "work"); err != nil {
			b.Fatal(err)
		}
		testkit.Eventually(w.t, "all open", 5*time.Minute, allSettled(c, func(s dbusapi.ChainState) bool { return s == dbusapi.ChainOpen }))
		settle := time.Since(t0)
		c1 := w.calls()
		peak := vmKiB(b, d.Process.Pid, "VmHWM:")
		for j := 0; j < n/2; j++ {
			if out, code := w.qcryptctl("close", fmt.Sprintf("c%02d", j)); code != 0 {
				b.Fatalf("close: %s", out)
			}
		}
		d.Process.Signal(syscall.SIGTERM)
		_ = d.Wait() // ended by a signal we sent; its status is not the point
		c2 := w.calls()
		t1 := time.Now()
		d = w.startDaemon()
		c = w.client()
		testkit.Eventually(w.t, "all reconciled", 5*time.Minute, func() bool {
			jobs, _ := c.Jobs(bg)
			done := 0
			for _, j := range jobs {
				if j.Operation == "reconcile" && j.State == "done" {
					done++
				}
			}
			return done == n
		})
		startup := time.Since(t1)
		c3 := w.calls()
		admin, qrexec := spent("50 opens", c0, c1)
		b.ReportMetric(settle.Seconds(), "settle-s")
		b.ReportMetric(float64(peak)/1024, "peak-MiB")
		b.ReportMetric(float64(admin)/n, "admin/chain")
		b.ReportMetric(float64(qrexec)/n, "qrexec/chain")
		admin, qrexec = spent("start-up", c2, c3)
		b.ReportMetric(startup.Seconds(), "startup-s")
		b.ReportMetric(float64(admin), "startup-admin")
		b.ReportMetric(float64(qrexec), "startup-qrexec")
		// Back to the start: all closed, work and mediator halted.
		if err := w.qubes.Shutdown(bg, "work", false, true); err != nil {
			b.Fatal(err)
		}
		testkit.Eventually(w.t, "all wait again", 5*time.Minute, allSettled(c, func(s dbusapi.ChainState) bool { return s == dbusapi.ChainWaiting || s == dbusapi.ChainClosed }))
		if err := w.qubes.Shutdown(bg, "mediator", false, true); err != nil {
			b.Fatal(err)
		}
		d.Process.Signal(syscall.SIGTERM)
		_ = d.Wait() // ended by a signal we sent; its status is not the point
	}
}

func vmKiB(b *testing.B, pid int, field string) int {
	data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(data), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == field {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	b.Fatalf("no %s", field)
	return 0
}

// BenchmarkUserOps is what a user waits for: qcryptctl open, status and close of an
// ad-hoc chain of 1, 2 and 3 layers, run as the binary, through qcryptd. It reports the
// wall time of each, and the Admin API and qrexec calls qcryptd made, on the simulator
// at zero latency, at a real machine's latencies (3 ms per Admin API call, 100 ms per
// qrexec call, spent waiting), and behind the real qubesd and qrexec (4.3; the calls
// are the same there, but the simulator does not see them to count).
func BenchmarkUserOps(b *testing.B) {
	table := []string{fmt.Sprintf("%-10s %-7s %-7s %9s %7s %7s", "world", "layers", "op", "wall ms", "qrexec", "admin")}
	for _, world := range []struct{ name, dialect, admin, qrexec string }{
		{"sim", "4.3", "0", "0"},
		{"sim-field", "4.3", "3ms", "100ms"},
		{"real-4.3", "real-4.3", "", ""},
	} {
		b.Run(world.name, func(b *testing.B) {
			w := newWorld(b, world.dialect, permissiveBus)
			w.startDaemon()
			w.ctl("add-vm", "m1")
			w.ctl("add-vm", "m2")
			specs := map[int][]string{}
			for layers := 1; layers <= 3; layers++ {
				spec := []string{"sys-usb", fmt.Sprintf("/home/user/b%d.luks", layers), fmt.Sprintf("b%d", layers)}
				for i := 1; i < layers; i++ {
					spec = append(spec, fmt.Sprintf("m%d", i))
				}
				spec = append(spec, "work")
				if out, code := w.qcryptctl(append([]string{"luks-init", "-a", "--size", "64M", "--fs", "ext4", "--enkey", "/dev/urandom", "--encon", "/dev/urandom"}, spec...)...); code != 0 {
					b.Fatalf("luks-init %d layers: %s", layers, out)
				}
				specs[layers] = spec
			}
			if world.admin != "" {
				w.ctl("latency", world.admin, world.qrexec)
			}
			for layers := 1; layers <= 3; layers++ {
				for _, op := range []string{"open", "status", "close"} {
					b.Run(fmt.Sprintf("layers=%d/op=%s", layers, op), func(b *testing.B) {
						wall, admin, qrexec := w.userOp(b, op, specs[layers])
						row := fmt.Sprintf("%-10s %-7d %-7s %9.0f", world.name, layers, op, wall)
						if !w.real { // behind the real qubesd the simulator does not see the calls
							b.ReportMetric(admin, "admin-calls/op")
							b.ReportMetric(qrexec, "qrexec-calls/op")
							row += fmt.Sprintf(" %7.0f %7.0f", qrexec, admin)
						}
						table = append(table, row)
					})
				}
			}
		})
	}
	// Printed, not logged: go test shows a passing benchmark's log only with -v.
	fmt.Printf("BenchmarkUserOps, as a user sees it (qcryptctl's wall time; calls qcryptd made):\n%s\n", strings.Join(table, "\n"))
}

// userOp times qcryptctl OP SPEC b.N times and returns the mean wall time in ms and the
// Admin API and qrexec calls per op; the chain is open before a status or close and
// closed before an open (set up outside the timer).
func (w *world) userOp(b *testing.B, op string, spec []string) (wall, admin, qrexec float64) {
	ctl := func(args ...string) {
		b.Helper()
		if out, code := w.qcryptctl(args...); code != 0 {
			b.Fatalf("qcryptctl %s: exit %d %s", strings.Join(args, " "), code, out)
		}
	}
	var took time.Duration
	var a, q int
	for b.Loop() {
		b.StopTimer()
		if op != "open" {
			ctl(append([]string{"open"}, spec...)...)
		}
		c0 := w.calls()
		b.StartTimer()
		t0 := time.Now()
		ctl(append([]string{op, "--"}, spec...)...)
		took += time.Since(t0)
		b.StopTimer()
		c1 := w.calls()
		a, q = a+c1["admin"]-c0["admin"], q+c1["qrexec"]-c0["qrexec"]
		if op != "close" {
			ctl(append([]string{"close", "--"}, spec...)...)
		}
		b.StartTimer()
	}
	n := float64(b.N)
	return float64(took.Milliseconds()) / n, float64(a) / n, float64(q) / n
}

// calls reads the simulator's counters: "admin", "qrexec" and one per Admin API method.
func (w *world) calls() map[string]int {
	m := map[string]int{}
	for _, f := range strings.Fields(w.ctl("calls")) {
		k, v, _ := strings.Cut(f, "=")
		m[k], _ = strconv.Atoi(v)
	}
	return m
}
