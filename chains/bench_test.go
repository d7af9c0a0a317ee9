package chains

import (
	"fmt"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim"
)

// benchChain creates (with luks-init) an n-layer chain sys-usb -> m1 .. m(n-1) -> work.
func benchChain(b *testing.B, r *rig, layers int) *Chain {
	b.Helper()
	c := &Chain{Name: fmt.Sprintf("bench%d", layers), SourceVM: "sys-usb", SourceFile: fmt.Sprintf("/home/user/bench%d.luks", layers),
		Key: fmt.Sprintf("bench%d", layers), MountPoint: "/mnt/bench", Type: "luks"}
	for i := 1; i < layers; i++ {
		vm := fmt.Sprintf("m%d", i)
		if _, ok := r.VM(vm); !ok {
			if _, err := r.AddVM(vm, "AppVM", "user"); err != nil {
				b.Fatal(err)
			}
		}
		c.Hops = append(c.Hops, Hop{VM: vm})
	}
	c.Hops = append(c.Hops, Hop{VM: "work"})
	r.e.Dom0, r.e.PrivateDir = r.Dom0(r.Runner), simPrivateDir
	if err := r.e.LuksInit(bg, InitSpec{Chain: c, Size: minContainerSize(c), FS: "ext4", Autostart: true}, nil); err != nil {
		b.Fatal(err)
	}
	return c
}

// BenchmarkChain reports per operation: Admin API calls, qrexec calls, and time.
// Targets: a 2-layer open in <= 3 qrexec and <= 12 Admin API calls; status <= 1 qrexec
// call per running qube. "cold" is the first open on a fresh engine and client with the
// intermediates halted (it starts them and learns default users and the device API).
func BenchmarkChain(b *testing.B) {
	for _, layers := range []int{1, 2, 3} {
		r := newRig(b, qubessim.R42)
		c := benchChain(b, r, layers)
		haltIntermediates(b, r, c)
		b.Run(fmt.Sprintf("layers=%d/op=open-cold", layers), func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				haltIntermediates(b, r, c)
				client := qubes.NewClient(r.Socket())
				fresh := &Engine{Qubes: client, Runner: r.Runner}
				q0 := r.Runner.Spawns()
				b.StartTimer()
				if err := fresh.Open(bg, c, OpenOptions{}, nil); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				report(b, client.Calls(), r.Runner.Spawns()-q0)
				if err := fresh.Close(bg, c, CloseOptions{}, Closing{}, nil); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
		for _, op := range []string{"open", "status", "close"} {
			b.Run(fmt.Sprintf("layers=%d/op=%s", layers, op), func(b *testing.B) {
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					if op != "open" {
						if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
							b.Fatal(err)
						}
					}
					a0, q0 := r.Client.Calls(), r.Runner.Spawns()
					b.StartTimer()
					var err error
					switch op {
					case "open":
						err = r.e.Open(bg, c, OpenOptions{}, nil)
					case "status":
						var st *Status
						if st, err = r.e.Status(bg, c); err == nil && !st.Open() {
							err = fmt.Errorf("not open: %+v", st)
						}
					case "close":
						err = r.e.Close(bg, c, CloseOptions{}, Closing{}, nil)
					}
					b.StopTimer()
					if err != nil {
						b.Fatal(err)
					}
					report(b, r.Client.Calls()-a0, r.Runner.Spawns()-q0)
					if op != "close" {
						if err := r.e.Close(bg, c, CloseOptions{}, Closing{}, nil); err != nil {
							b.Fatal(err)
						}
					}
					b.StartTimer()
				}
			})
		}
	}
}

// haltIntermediates shuts down c's intermediate qubes that run (a close leaves them
// running; qubesd refuses to shut down a halted one).
func haltIntermediates(b *testing.B, r *rig, c *Chain) {
	b.Helper()
	states, err := r.Client.ListVMs(bg)
	if err != nil {
		b.Fatal(err)
	}
	for _, vm := range states {
		if c.Involves(vm.Name) && vm.Name != c.SourceVM && vm.Name != c.Target() && qubes.IsRunning(vm.State) {
			if err := r.Client.Shutdown(bg, vm.Name, false, true); err != nil {
				b.Fatal(err)
			}
		}
	}
}

func report(b *testing.B, admin, qrexec int64) {
	b.ReportMetric(float64(admin), "admin-calls/op")
	b.ReportMetric(float64(qrexec), "qrexec-calls/op")
	b.ReportMetric(0, "other-spawns/op") // see TestEngineSpawnsOnlyThroughTheRunner
}

// TestEngineSpawnsOnlyThroughTheRunner backs the benchmark's "other-spawns/op = 0": the
// chains package cannot start processes itself.
func TestEngineSpawnsOnlyThroughTheRunner(t *testing.T) {
	t.Parallel()
	files, _ := filepath.Glob("*.go")
	fset := token.NewFileSet()
	for _, f := range files {
		if filepath.Ext(f) != ".go" || len(f) > 8 && f[len(f)-8:] == "_test.go" {
			continue
		}
		ast, err := parser.ParseFile(fset, f, nil, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range ast.Imports {
			if p, _ := strconv.Unquote(imp.Path.Value); p == "os/exec" {
				t.Errorf("%s imports %s", f, p)
			}
		}
		src, _ := os.ReadFile(f)
		for _, call := range []string{"StartProcess", "ForkExec", "syscall.Exec"} {
			if strings.Contains(string(src), call) {
				t.Errorf("%s calls %s", f, call)
			}
		}
	}
}
