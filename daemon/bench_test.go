package daemon_test

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/chains"
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

func rssKiB(b *testing.B, pid int) int {
	data, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(data), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	b.Fatal("no VmRSS")
	return 0
}

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
			w.qubes.Start(bg, "work")
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
