package qubes_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim"
	"github.com/qcrypt/qcrypt/qubessim/control"
	"github.com/qcrypt/qcrypt/qubessim/simtest"
)

// collect reads events until one satisfies stop (or a timeout) and returns them.
func collect(t *testing.T, ch <-chan qubes.Event, stop func(qubes.Event) bool) []qubes.Event {
	t.Helper()
	var got []qubes.Event
	timeout := time.After(20 * time.Second)
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				t.Fatalf("stream closed; got %v", names(got))
			}
			got = append(got, ev)
			if stop(ev) {
				return got
			}
		case <-timeout:
			t.Fatalf("timed out; got %v", names(got))
		}
	}
}

func names(evs []qubes.Event) []string {
	var out []string
	for _, e := range evs {
		if e.Subject != "" {
			out = append(out, e.Subject+":"+e.Name)
		} else {
			out = append(out, e.Name)
		}
	}
	return out
}

func is(kind qubes.EventKind, subject string) func(qubes.Event) bool {
	return func(e qubes.Event) bool { return e.Kind == kind && e.Subject == subject }
}

func subscribe(t *testing.T, f *simtest.Fixture) <-chan qubes.Event {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	ch := f.Client.Events(ctx, qubes.Backoff{Min: 10 * time.Millisecond, Max: 100 * time.Millisecond})
	first := collect(t, ch, func(qubes.Event) bool { return true })
	if first[0].Kind != qubes.EventResync {
		t.Fatalf("first event %v, want connection-established", first[0].Name)
	}
	return ch
}

func TestEventSequences(t *testing.T) {
	t.Parallel()
	for _, d := range []qubessim.Dialect{qubessim.R42, qubessim.R43} {
		t.Run(string(d), func(t *testing.T) {
			f := simtest.StartDemo(t, d)
			ch := subscribe(t, f)
			ctx := context.Background()

			if err := f.Client.Start(ctx, "work"); err != nil {
				t.Fatal(err)
			}
			start := names(collect(t, ch, is(qubes.EventDomainStart, "work")))
			// As the real qubesd: R4.2 sends domain-unpaused after domain-start, R4.3 before.
			want := "work:domain-pre-start work:domain-pre-spawn work:property-reset:xid work:property-reset:stubdom_xid work:property-reset:start_time work:domain-spawn work:domain-start"
			if d == qubessim.R43 {
				want = strings.Replace(want, "work:domain-start", "work:domain-pre-unpaused work:domain-unpaused work:domain-start", 1)
			}
			if got := strings.Join(start, " "); got != want {
				t.Errorf("start sequence\n got %s\nwant %s", got, want)
			}

			// A loop device in the source qube is a device appearing.
			f.Sh(t, "sys-usb", "losetup -f --show "+qubessim.DemoContainer)
			if d == qubessim.R42 {
				collect(t, ch, is(qubes.EventDeviceListChange, "sys-usb"))
			} else {
				added := collect(t, ch, is(qubes.EventDeviceAdded, "sys-usb"))
				if dev := added[len(added)-1].Device; dev != (qubes.DeviceRef{Backend: "sys-usb", Port: "loop0"}) {
					t.Errorf("device-added names %+v", dev)
				}
			}

			if err := f.Client.Attach(ctx, "work", qubes.DeviceRef{Backend: "sys-usb", Port: "loop0"}, true); err != nil {
				t.Fatal(err)
			}
			att := collect(t, ch, is(qubes.EventDeviceAttach, "work"))
			if dev := att[len(att)-1].Device; dev != (qubes.DeviceRef{Backend: "sys-usb", Port: "loop0"}) {
				t.Errorf("attach event device %+v", dev)
			}

			// Shutting the frontend down: R4.2 sends no device event, R4.3 a detach.
			if err := f.Client.Shutdown(ctx, "work", false, false); err != nil {
				t.Fatal(err)
			}
			var stop []qubes.Event
			for _, e := range collect(t, ch, is(qubes.EventDomainShutdown, "work")) {
				if e.Subject == "work" {
					stop = append(stop, e)
				}
			}
			sawDetach := false
			for _, e := range stop {
				if e.Kind == qubes.EventDeviceDetach {
					sawDetach = true
				}
			}
			if sawDetach != (d == qubessim.R43) {
				t.Errorf("device-detach on frontend shutdown: %v (dialect %s): %v", sawDetach, d, names(stop))
			}
			tail := names(stop)
			if got := strings.Join(tail[len(tail)-5:], " "); got != "work:domain-stopped work:property-reset:xid work:property-reset:stubdom_xid work:property-reset:start_time work:domain-shutdown" {
				t.Errorf("shutdown tail: %s", got)
			}
			if tail[0] != "work:domain-pre-shutdown" {
				t.Errorf("shutdown starts with %s", tail[0])
			}
		})
	}
}

func TestEventStreamResyncsAfterDrop(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R42)
	ch := subscribe(t, f)
	f.DropEventStreams()
	got := collect(t, ch, is(qubes.EventResync, ""))
	if got[0].Kind != qubes.EventDisconnected || got[0].Err == nil {
		t.Errorf("first after drop: %+v", got[0])
	}
	// The new connection delivers events again.
	if err := f.Client.Pause(context.Background(), "sys-usb"); err != nil {
		t.Fatal(err)
	}
	collect(t, ch, is(qubes.EventDomainPaused, "sys-usb"))
}

func TestEventStreamReconnectsWhenQubesdIsBack(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R42)
	ch := subscribe(t, f)
	f.Close() // qubesd goes away
	got := collect(t, ch, is(qubes.EventDisconnected, ""))
	if len(got) != 1 {
		t.Fatalf("got %v", names(got))
	}
	// Attempts fail while it is gone: more disconnected events, with backoff.
	collect(t, ch, is(qubes.EventDisconnected, ""))
	// qubesd comes back on the same socket: the stream resyncs and delivers again.
	back, err := qubessim.Start(qubessim.Config{Dir: t.TempDir(), Socket: f.Socket(), ToolsBinary: os.Args[0], Demo: true})
	if err != nil {
		t.Fatal(err)
	}
	defer back.Close()
	collect(t, ch, is(qubes.EventResync, ""))
	if err := f.Client.Start(context.Background(), "work"); err != nil {
		t.Fatal(err)
	}
	collect(t, ch, is(qubes.EventDomainStart, "work"))
}

func TestSimulatorEventDestFilter(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R42)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// A subscription for one qube gets only its events (raw request, dest work).
	conn := dialEvents(t, f.Socket(), "work")
	defer conn.close()
	if err := f.Client.Start(ctx, "mediator"); err != nil {
		t.Fatal(err)
	}
	if err := f.Client.Start(ctx, "work"); err != nil {
		t.Fatal(err)
	}
	for {
		ev := conn.next(t)
		if ev.Subject != "" && ev.Subject != "work" {
			t.Fatalf("event of %s on a work-only stream", ev.Subject)
		}
		if ev.Kind == qubes.EventDomainStart {
			break
		}
	}
}

// runnerWorld is where TestRunner runs its cases: qubes-sim's stand-in qrexec-client,
// or the real qrexec (client, daemon, agent) of a Qubes release.
type runnerWorld struct {
	runner  *qubes.Runner
	running string // a qube that runs
	halted  string // one that does not
	// shared: a directory a script in the running qube writes (inside) that the test
	// sees (outside).
	inside, outside string
	hang, unhang    func() // the running qube's agent stops answering, and goes on
	crash           func() // the running qube dies at once
}

func runnerWorlds() map[string]func(t testing.TB) *runnerWorld {
	return map[string]func(t testing.TB) *runnerWorld{
		"stand-in": func(t testing.TB) *runnerWorld {
			f := simtest.StartDemo(t, qubessim.R42)
			usb, _ := f.VM("sys-usb")
			return &runnerWorld{runner: f.Runner, running: "sys-usb", halted: "work",
				inside: "/tmp", outside: filepath.Join(usb.Root(), "tmp"),
				// A paused qube's agent does not answer, as a frozen one.
				hang:   func() { checked(t, f.Client.Pause(context.Background(), "sys-usb")) },
				unhang: func() { checked(t, f.Client.Unpause(context.Background(), "sys-usb")) },
				crash:  func() { checked(t, f.Client.Kill(context.Background(), "sys-usb")) }}
		},
		"real-4.2": func(t testing.TB) *runnerWorld { return realRunnerWorld(t, "4.2") },
		"real-4.3": func(t testing.TB) *runnerWorld { return realRunnerWorld(t, "4.3") },
	}
}

func realRunnerWorld(t testing.TB, version string) *runnerWorld {
	out := simtest.RealQrexec(t, version)
	// Short: qrexec-daemon 4.2's socket path must fit in 39 bytes (t.TempDir's does not).
	run, err := os.MkdirTemp("/tmp", "rq")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(run) })
	vm := simtest.StartQrexecVM(t, out, run, "sys-usb", 2)
	r := qubes.NewRunner([]string{vm.Client})
	r.Timeout = time.Minute
	// The sandbox's /run/vchan is the run directory's vchan/ (the vchan's sockets).
	return &runnerWorld{runner: r, running: "sys-usb", halted: "work",
		inside: "/run/vchan", outside: filepath.Join(run, "vchan"),
		hang: vm.Freeze, unhang: vm.Thaw, crash: vm.Crash}
}

// The runner's handling of what qrexec-client reports, against the stand-in and the real
// programs alike: exit statuses, the statuses reserved for transport failures, output
// floods, input, timeouts, a hung agent and a qube that dies during a call.
func TestRunner(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	for name, newWorld := range runnerWorlds() {
		t.Run(name, func(t *testing.T) {
			w := newWorld(t)
			testRunnerIn(ctx, t, w)
		})
	}
}

func testRunnerIn(ctx context.Context, t *testing.T, w *runnerWorld) {
	tests := map[string]struct {
		script   string
		code     int
		stdout   string
		trunc    bool
		vm       string
		transErr int
	}{
		"exit status":                         {script: "echo hi; exit 3", code: 3, stdout: "hi\n"},
		"127 from a command is not transport": {script: "no-such-command-here", code: 124},
		"126 too":                             {script: "exit 126", code: 124},
		"255 too":                             {script: "exit 255", code: 124},
		"killed by a signal":                  {script: "kill -TERM $$", code: 143},
		"runs as root":                        {script: `[ "$(id -u)" = 0 ] && echo ok`, stdout: "ok\n"},
		"flood is cut":                        {script: "head -c 1000000 /dev/zero", stdout: string(make([]byte, 64<<10)), trunc: true},
		"halted qube":                         {script: "true", vm: w.halted, transErr: qubes.ExitQrexecProblem},
		"unknown qube":                        {script: "true", vm: "nosuchvm", transErr: qubes.ExitQrexecProblem},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			vm := tc.vm
			if vm == "" {
				vm = w.running
			}
			res, err := w.runner.Run(ctx, vm, tc.script, nil)
			if tc.transErr != 0 {
				var te *qubes.TransportError
				if !errors.As(err, &te) || te.Code != tc.transErr || !errors.Is(err, qubes.ErrTransport) {
					t.Fatalf("got %v, want transport error %d", err, tc.transErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if res.ExitCode != tc.code || string(res.Stdout) != tc.stdout || res.StdoutTruncated != tc.trunc {
				t.Errorf("got code %d stdout %.40q trunc %v", res.ExitCode, res.Stdout, res.StdoutTruncated)
			}
		})
	}
	t.Run("input follows the script", func(t *testing.T) {
		data := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
		res, err := w.runner.Run(ctx, w.running, "cat > /tmp/in && sha256sum /tmp/in | cut -d' ' -f1", bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		if got, want := strings.TrimSpace(string(res.Stdout)), fmt.Sprintf("%x", sha256.Sum256(data)); got != want {
			t.Errorf("checksum %s, want %s", got, want)
		}
	})
	t.Run("a long command is killed at the timeout", func(t *testing.T) {
		tctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		_, err := w.runner.Run(tctx, w.running, "sleep 30", nil)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("got %v", err)
		}
	})
	t.Run("a hung agent", func(t *testing.T) {
		w.hang()
		defer w.unhang()
		tctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		defer cancel()
		if _, err := w.runner.Run(tctx, w.running, "true", nil); !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("cut off by the context: got %v", err)
		}
		// With a connect timeout, qrexec-client itself gives up: a transport failure.
		r := qubes.NewRunner(w.runner.Command)
		r.ConnectTimeout = 1
		_, err := r.Run(ctx, w.running, "true", nil)
		var te *qubes.TransportError
		if !errors.As(err, &te) || te.Code != qubes.ExitQrexecProblem {
			t.Errorf("past the connect timeout: got %v, want transport error 125", err)
		}
	})
	t.Run("bad qube name never reaches qrexec", func(t *testing.T) {
		before := w.runner.Spawns()
		if _, err := w.runner.Run(ctx, "-d", "true", nil); err == nil {
			t.Error("accepted")
		}
		if w.runner.Spawns() != before {
			t.Error("spawned")
		}
	})
	// Last: the qube is gone afterwards.
	t.Run("the qube dies during the call", func(t *testing.T) {
		marker := filepath.Join(w.outside, "running")
		errc := make(chan error, 1)
		go func() {
			_, err := w.runner.Run(ctx, w.running, "touch "+w.inside+"/running; sleep 60", nil)
			errc <- err
		}()
		for {
			if _, err := os.Stat(marker); err == nil {
				break
			}
			select {
			case err := <-errc:
				t.Fatalf("the call ended (%v) before it ran", err)
			case <-time.After(10 * time.Millisecond):
			}
		}
		w.crash()
		err := <-errc
		var te *qubes.TransportError
		if !errors.As(err, &te) || te.Code != qubes.ExitQrexecLost {
			t.Errorf("got %v, want transport error 255 (result unknown)", err)
		}
	})
}

// BenchmarkRunner reports one qubes.VMShell call of a short script through the stand-in
// and through the real qrexec.
func BenchmarkRunner(b *testing.B) {
	for _, name := range []string{"stand-in", "real-4.2", "real-4.3"} {
		b.Run(name, func(b *testing.B) {
			w := runnerWorlds()[name](b)
			for b.Loop() {
				if res, err := w.runner.Run(context.Background(), w.running, "echo hi", nil); err != nil || string(res.Stdout) != "hi\n" {
					b.Fatalf("%+v %v", res, err)
				}
			}
		})
	}
}

// The stand-in's qubes have the simulator's home directory.
func TestRunnerStandInHome(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R42)
	res, err := f.Runner.Run(context.Background(), "sys-usb", `[ -d /home/user/.qcrypt/keys ] && echo ok`, nil)
	if err != nil || string(res.Stdout) != "ok\n" {
		t.Errorf("got %q %v", res.Stdout, err)
	}
}

// An injected qrexec failure (stand-in only) is a transport error.
func TestRunnerStandInInjectedFailure(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R42)
	f.SetQrexecFault("sys-usb", control.QrexecFault{Exit: qubes.ExitQrexecRefused})
	_, err := f.Runner.Run(context.Background(), "sys-usb", "true", nil)
	var te *qubes.TransportError
	if !errors.As(err, &te) || te.Code != qubes.ExitQrexecRefused {
		t.Errorf("got %v", err)
	}
}

func TestRunnerInvocation(t *testing.T) {
	t.Parallel()
	// A stand-in qrexec-client that reports its argv and stdin: the exact invocation of
	// spec §6.3.
	dir := t.TempDir()
	script := dir + "/qrexec-client"
	writeFile(t, script, "#!/bin/sh\nprintf '%s|' \"$@\"; echo; cat\n", 0o755)
	r := qubes.NewRunner([]string{script})
	r.ConnectTimeout = 7
	res, err := r.Run(context.Background(), "work", "echo hi", strings.NewReader("INPUT"))
	if err != nil {
		t.Fatal(err)
	}
	want := "-d|work|-w|7|root:QUBESRPC qubes.VMShell+ dom0|\n" + qubes.WrapScript("echo hi") + "INPUT"
	if string(res.Stdout) != want {
		t.Errorf("got\n%q\nwant\n%q", res.Stdout, want)
	}
}
