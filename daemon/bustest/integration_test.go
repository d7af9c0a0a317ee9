package bustest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubessim/memkernel"
	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

var bg = context.Background()

func TestWorkStartOpensAndShutdownCloses(t *testing.T) {
	t.Parallel()
	for _, dialect := range worlds {
		t.Run(dialect, func(t *testing.T) {
			w := newWorld(t, dialect, permissiveBus)
			w.writeChain("demo", demoChain)
			w.startDaemon()
			c := w.client()
			ci := w.waitState(c, "demo", "waiting", 20*time.Second)
			if ci.Waiting != "waiting for work" {
				t.Errorf("waiting %q", ci.Waiting)
			}
			if err := w.qubes.Start(bg, "work"); err != nil {
				t.Fatal(err)
			}
			w.waitState(c, "demo", "open", 30*time.Second)
			st, err := c.Status(bg, "demo")
			if err != nil || !st.Open() {
				t.Fatalf("status %+v %v", st, err)
			}
			w.sh("work", "echo kept > /mnt/demo/f")
			if err := w.qubes.Shutdown(bg, "work", false, true); err != nil {
				t.Fatal(err)
			}
			ci = w.waitState(c, "demo", "waiting", 30*time.Second)
			if ci.LastError != "" {
				t.Errorf("last error %q", ci.LastError)
			}
			// Nothing of the chain is left in the running qubes.
			if out := string(w.sh("mediator", "ls /dev/mapper").Stdout); out != "" {
				t.Errorf("mediator still has %q", out)
			}
			if out := string(w.sh("sys-usb", "losetup -a").Stdout); out != "" {
				t.Errorf("sys-usb still has %q", out)
			}
			// And the data is there on the next start.
			if err := w.qubes.Start(bg, "work"); err != nil {
				t.Fatal(err)
			}
			w.waitState(c, "demo", "open", 30*time.Second)
			if got := string(w.sh("work", "cat /mnt/demo/f").Stdout); got != "kept\n" {
				t.Errorf("after reopen: %q", got)
			}
		})
	}
}

func TestPluggedDiskOpensDeviceChain(t *testing.T) {
	t.Parallel()
	for _, dialect := range worlds {
		t.Run(dialect, func(t *testing.T) {
			w := newWorld(t, dialect, permissiveBus)
			// A USB disk that holds a copy of the demo container (keys: mediator, work).
			container, err := os.ReadFile(filepath.Join(w.simDir, "qubes/sys-usb/home/user/demo.luks"))
			if err != nil {
				t.Fatal(err)
			}
			img := filepath.Join(w.dir, "usb.img")
			if err := memkernel.MakeDiskImage(img, 16<<20, "QCRYPTUSB", map[string][]byte{"containers/demo.luks": container}); err != nil {
				t.Fatal(err)
			}
			w.writeChain("usb", `source vm=sys-usb
source device=/dev/disk/by-label/QCRYPTUSB
source mount point=/mnt/usb
source file=/containers/demo.luks
key=demo
destination vm 1=mediator
destination vm 2=work
destination mount point=/mnt/usb-demo
startup interval=0
`)
			if err := w.qubes.Start(bg, "work"); err != nil {
				t.Fatal(err)
			}
			w.startDaemon()
			c := w.client()
			ci := w.waitState(c, "usb", "waiting", 30*time.Second)
			if !strings.Contains(ci.Waiting, "QCRYPTUSB") {
				t.Errorf("waiting for %q", ci.Waiting)
			}
			port := strings.TrimSpace(w.ctl("plug", "sys-usb", img))
			w.waitState(c, "usb", "open", 30*time.Second)
			// Pulled out: the chain closes and waits for the disk again.
			w.ctl("unplug", "sys-usb", port)
			ci = w.waitState(c, "usb", "waiting", time.Minute)
			if !strings.Contains(ci.Waiting, "QCRYPTUSB") {
				t.Errorf("after the unplug waiting for %q", ci.Waiting)
			}
			if out := string(w.sh("mediator", "ls /dev/mapper").Stdout); out != "" {
				t.Errorf("mediator still has %q after the unplug", out)
			}
			w.ctl("plug", "sys-usb", img)
			w.waitState(c, "usb", "open", time.Minute)
			if out := string(w.sh("work", "findmnt -n -o OPTIONS /mnt/usb-demo").Stdout); out != "ro,nosuid,nodev\n" {
				t.Errorf("mount options %q (read-only and nosuid,nodev are the defaults)", out)
			}
			// Close with eject: the USB disk is unmounted in sys-usb too.
			if r, err := c.RunJob(bg, c.Close("usb", chains.CloseOptions{Eject: true}), nil); err != nil || !r.Success {
				t.Fatalf("close --eject: %+v %v", r, err)
			}
			if res := w.sh("sys-usb", "findmnt -n /mnt/usb"); res.ExitCode == 0 {
				t.Errorf("the source device is still mounted: %q", res.Stdout)
			}
		})
	}
}

func TestOpenCloseStormEndsConsistent(t *testing.T) {
	t.Parallel()
	w, _, c := demoDaemon(t, "open")
	var wg sync.WaitGroup
	results := make([]dbusapi.JobResult, 100)
	errs := make([]error, 100)
	for i := 0; i < 100; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			cl, err := dbusapi.ConnectAt(w.busAddr)
			if err != nil {
				errs[i] = err
				return
			}
			defer cl.Disconnect()
			start := cl.Open("demo", chains.OpenOptions{})
			if i%2 == 1 {
				start = cl.Close("demo", chains.CloseOptions{})
			}
			results[i], errs[i] = cl.RunJob(bg, start, nil)
		}(i)
	}
	wg.Wait()
	done, superseded := 0, 0
	for i := range results {
		if errs[i] != nil {
			t.Fatalf("call %d: %v", i, errs[i])
		}
		switch {
		case results[i].Success:
			done++
		case strings.Contains(results[i].Message, "superseded"):
			superseded++
		default:
			t.Errorf("job %d failed: %s", i, results[i].Message)
		}
	}
	t.Logf("100 calls: %d ran, %d superseded", done, superseded)
	ci, err := c.Chain(bg, "demo")
	if err != nil {
		t.Fatal(err)
	}
	st, err := c.Status(bg, "demo")
	if err != nil {
		t.Fatal(err)
	}
	switch ci.State {
	case "open":
		if !st.Open() {
			t.Errorf("state open but status %+v", st)
		}
	case "closed", "waiting":
		if !st.Closed() {
			t.Errorf("state %s but status %+v", ci.State, st)
		}
	default:
		t.Errorf("storm ended in state %s (%s)", ci.State, ci.LastError)
	}
}

func TestKilledMidOpenReconcilesOnRestart(t *testing.T) {
	t.Parallel()
	for _, dialect := range worlds {
		t.Run(dialect, func(t *testing.T) {
			w := newWorld(t, dialect, permissiveBus)
			w.writeChain("demo", demoChain)
			d := w.startDaemon()
			c := w.client()
			w.waitState(c, "demo", "waiting", 30*time.Second)
			w.holdAutoOpenInWork()
			changes := w.watchChanges()
			d.Process.Signal(syscall.SIGKILL)
			_ = d.Wait() // ended by a signal we sent; its status is not the point
			w.ctl("qrexec-fault", "work", "none")
			w.startDaemon()
			c = w.client()
			// The restarted qcryptd rolls the half-open chain back (or, if the held call in
			// work finished meanwhile, finds it open), then it opens.
			changes.waitFor(t, "reconciling the interrupted open", time.Minute, func(ev dbusapi.ChainEvent) bool {
				return ev.Chain == "demo" && (ev.Reason.Cause == dbusapi.CauseRollBack || ev.Reason.Cause == dbusapi.CauseFoundOpen)
			})
			w.waitState(c, "demo", "open", time.Minute)
			st, err := c.Status(bg, "demo")
			if err != nil || !st.Open() {
				t.Errorf("status after restart %+v %v", st, err)
			}
		})
	}
}

// TestTargetShutDownWhileStopped shuts the target down while qcryptd is stopped: on its
// start qcryptd finds mediator still decrypting and, since its journal shows it opened
// the chain, closes what is left instead of calling the chain degraded.
func TestTargetShutDownWhileStopped(t *testing.T) {
	t.Parallel()
	for _, dialect := range worlds {
		t.Run(dialect, func(t *testing.T) {
			w := newWorld(t, dialect, permissiveBus)
			w.writeChain("demo", demoChain)
			if err := w.qubes.Start(bg, "work"); err != nil {
				t.Fatal(err)
			}
			d := w.startDaemon()
			w.waitState(w.client(), "demo", "open", time.Minute)
			d.Process.Signal(syscall.SIGTERM)
			_ = d.Wait() // ended by a signal we sent; its status is not the point
			if err := w.qubes.Shutdown(bg, "work", false, true); err != nil {
				t.Fatal(err)
			}
			w.startDaemon()
			ci := w.waitState(w.client(), "demo", "waiting", time.Minute)
			if ci.Waiting != "waiting for work" {
				t.Errorf("waiting %q", ci.Waiting)
			}
			if out := w.sh("mediator", "ls /dev/mapper").Stdout; len(out) != 0 {
				t.Errorf("mediator still decrypts: %q", out)
			}
			if out := w.sh("sys-usb", "losetup -a").Stdout; len(out) != 0 {
				t.Errorf("sys-usb still has a loop device: %q", out)
			}
		})
	}
}

// TestFailedRollbackUndoneOnReconnect: an open fails and its rollback cannot detach
// (qubesd answers nothing, as when it goes away meanwhile), so parts stay. When qcryptd
// next connects to qubesd it rolls them back by its journal and opens the chain.
func TestFailedRollbackUndoneOnReconnect(t *testing.T) {
	t.Parallel()
	w := newWorld(t, "4.3", permissiveBus)
	w.writeChain("demo", demoChain)
	w.startDaemon()
	c := w.client()
	w.waitState(c, "demo", "waiting", 30*time.Second)
	w.ctl("fault", "admin.vm.device.block.Attach", "empty", "work")
	w.ctl("fault", "admin.vm.device.block.Detach", "empty")
	if err := w.qubes.Start(bg, "work"); err != nil {
		t.Fatal(err)
	}
	ci := w.waitState(c, "demo", "failed", time.Minute)
	if !strings.Contains(ci.LastError, "rollback") {
		t.Errorf("last error %q does not tell of the failed rollback", ci.LastError)
	}
	if atts, _ := w.qubes.Attached(bg, "mediator"); len(atts) == 0 {
		t.Fatal("nothing was left attached to mediator: the test does not test anything")
	}
	w.ctl("clear-faults")
	w.ctl("drop-events")
	w.waitState(c, "demo", "open", time.Minute)
}

// TestQubeCreatedLater: a chain names a qube that does not exist yet; when it is
// created, qcryptd learns it from qubesd's domain-add and says the chain waits for it.
func TestQubeCreatedLater(t *testing.T) {
	t.Parallel()
	for _, dialect := range worlds {
		t.Run(dialect, func(t *testing.T) {
			w := newWorld(t, dialect, permissiveBus)
			w.writeChain("demo", strings.Replace(demoChain, "destination vm 2=work", "destination vm 2=vault", 1))
			w.startDaemon()
			c := w.client()
			ci := w.waitState(c, "demo", "waiting", 30*time.Second)
			if ci.Waiting != "waiting for vault (no such qube)" {
				t.Errorf("waiting %q", ci.Waiting)
			}
			w.ctl("add-vm", "vault")
			testkit.Eventually(w.t, "the chain waits for the new qube", time.Minute, func() bool {
				ci, err := c.Chain(bg, "demo")
				return err == nil && ci.Waiting == "waiting for vault"
			})
		})
	}
}

// TestQubeKilledMidOpen kills the target while the open waits in it: the open fails,
// rolls back what it did in the other qubes and the chain waits for the target again.
func TestQubeKilledMidOpen(t *testing.T) {
	t.Parallel()
	for _, dialect := range worlds {
		t.Run(dialect, func(t *testing.T) {
			w := newWorld(t, dialect, permissiveBus)
			w.writeChain("demo", demoChain)
			w.startDaemon()
			c := w.client()
			w.waitState(c, "demo", "waiting", 30*time.Second)
			w.holdAutoOpenInWork()
			if err := w.qubes.Kill(bg, "work"); err != nil {
				t.Fatal(err)
			}
			ci := w.waitState(c, "demo", "waiting", time.Minute)
			if ci.Waiting != "waiting for work" {
				t.Errorf("waiting %q", ci.Waiting)
			}
			testkit.Eventually(w.t, "the open is rolled back", 30*time.Second, func() bool {
				return len(w.sh("mediator", "ls /dev/mapper").Stdout) == 0 && len(w.sh("sys-usb", "losetup -a").Stdout) == 0
			})
			// And the next start opens it.
			w.ctl("qrexec-fault", "work", "none")
			if err := w.qubes.Start(bg, "work"); err != nil {
				t.Fatal(err)
			}
			w.waitState(c, "demo", "open", time.Minute)
		})
	}
}

// TestQubesdRestartWhileOpen restarts qubesd under an open chain (the real one keeps its
// store; the simulator's own cuts the event streams): qcryptd reconnects, finds the chain
// open and follows the new event stream.
func TestQubesdRestartWhileOpen(t *testing.T) {
	t.Parallel()
	for _, dialect := range worlds {
		t.Run(dialect, func(t *testing.T) {
			w := newWorld(t, dialect, permissiveBus)
			w.writeChain("demo", demoChain)
			if err := w.qubes.Start(bg, "work"); err != nil {
				t.Fatal(err)
			}
			w.startDaemon()
			c := w.client()
			w.waitState(c, "demo", "open", time.Minute)
			reconnected := w.expectReconnect(c)
			if w.real {
				w.ctl("restart-qubesd")
			} else {
				w.ctl("drop-events")
			}
			reconnected(time.Minute)
			st, err := c.Status(bg, "demo")
			if err != nil || !st.Open() {
				t.Fatalf("status after the restart %+v %v", st, err)
			}
			if err := w.qubes.Shutdown(bg, "work", false, true); err != nil {
				t.Fatal(err)
			}
			w.waitState(c, "demo", "waiting", time.Minute)
			if out := string(w.sh("mediator", "ls /dev/mapper").Stdout); out != "" {
				t.Errorf("mediator still has %q", out)
			}
		})
	}
}

// TestSystemBusRestart restarts the system bus under an open chain and closes the chain
// while the bus is down: qcryptd stays up, comes back on the new bus with the state it
// has now, and follows events as before.
func TestSystemBusRestart(t *testing.T) {
	t.Parallel()
	w := newWorld(t, "4.3", permissiveBus)
	w.writeChain("demo", demoChain)
	if err := w.qubes.Start(bg, "work"); err != nil {
		t.Fatal(err)
	}
	w.startDaemon()
	w.waitState(w.client(), "demo", "open", time.Minute)
	w.busStop()
	// The close publishes its steps while there is no bus.
	if err := w.qubes.Shutdown(bg, "work", false, true); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(w.t, "the chain is closed in the qubes", time.Minute, func() bool {
		return len(w.sh("sys-usb", "losetup -a").Stdout) == 0
	})
	w.restartBus()
	testkit.Eventually(w.t, "qcryptd owns its name on the new bus", time.Minute, func() bool {
		c, err := dbusapi.ConnectAt(w.busAddr)
		if err == nil {
			c.Disconnect()
		}
		return err == nil
	})
	c := w.client()
	w.waitState(c, "demo", "waiting", time.Minute)
	if err := w.qubes.Start(bg, "work"); err != nil {
		t.Fatal(err)
	}
	w.waitState(c, "demo", "open", time.Minute)
}

func TestSdNotify(t *testing.T) {
	t.Parallel()
	w := newWorld(t, "4.2", permissiveBus)
	w.writeChain("demo", demoChain)
	sock := filepath.Join(w.dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	msgs := make(chan string, 100)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	d := w.startDaemon("NOTIFY_SOCKET=" + sock)
	var got []string
	collect := func(until string) {
		timeout := time.After(20 * time.Second)
		for {
			select {
			case m := <-msgs:
				got = append(got, m)
				if strings.HasPrefix(m, until) {
					return
				}
			case <-timeout:
				t.Fatalf("no %s; got %q", until, got)
			}
		}
	}
	collect("READY=1")
	collect("STATUS=1 chains: 1 waiting (waiting for work)")
	d.Process.Signal(syscall.SIGTERM)
	collect("STOPPING=1")
	if err := d.Wait(); err != nil {
		t.Errorf("qcryptd exited with %v", err)
	}
	t.Logf("notifications: %q", got)
}

func TestIntrospectionGolden(t *testing.T) {
	t.Parallel()
	w, _, _ := demoDaemon(t, "waiting")
	for name, path := range map[string]string{"manager": string(dbusapi.ManagerPath), "chain": string(dbusapi.ChainPath("demo"))} {
		out, err := exec.Command("busctl", "--address="+w.busAddr, "introspect", dbusapi.BusName, path).CombinedOutput()
		if err != nil {
			t.Fatalf("busctl: %v %s", err, out)
		}
		// Values that change from run to run.
		lines := strings.Split(string(out), "\n")
		for i, l := range lines {
			if strings.HasPrefix(l, ".LastChange") || strings.HasPrefix(l, ".Summary") {
				f := strings.Fields(l)
				lines[i] = fmt.Sprintf("%s %s %s", f[0], f[1], f[2])
			}
		}
		testkit.Golden(t, "testdata/golden/introspect-"+name+".txt", strings.Join(lines, "\n"))
	}
	tree, _ := exec.Command("busctl", "--address="+w.busAddr, "tree", dbusapi.BusName).CombinedOutput()
	if !strings.Contains(string(tree), "/org/qcrypt/Qcryptd1/chain/demo") {
		t.Errorf("busctl tree:\n%s", tree)
	}
}

// TestEventToOpenLatency measures, over 20 runs, the time from admin.vm.Start of the
// target returning (its domain-start event is out) to the chain's StateChanged to open.
func TestEventToOpenLatency(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("measurement")
	}
	w, _, c := demoDaemon(t, "waiting")
	opened := make(chan time.Time, 64)
	subscribed := make(chan struct{})
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	watchErr := make(chan error, 1)
	go func() {
		watchErr <- c.Watch(ctx, dbusapi.Watcher{ // ends with ctx
			Change: func(ev dbusapi.ChainEvent) {
				if ev.Chain == "demo" && ev.State == dbusapi.ChainOpen {
					opened <- time.Now()
				}
			},
			Subscribed: func() { close(subscribed) }})
	}()
	select {
	case <-subscribed:
	case err := <-watchErr:
		t.Fatalf("watch: %v", err)
	}
	var lat []time.Duration
	for i := 0; i < 20; i++ {
		if err := w.qubes.Start(bg, "work"); err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		select {
		case t1 := <-opened:
			lat = append(lat, t1.Sub(t0))
		case <-time.After(time.Minute):
			t.Fatalf("run %d: no open seen", i)
		}
		if err := w.qubes.Shutdown(bg, "work", false, true); err != nil {
			t.Fatal(err)
		}
		w.waitState(c, "demo", "waiting", 30*time.Second)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	t.Logf("event-to-open latency over %d runs: min %v, median %v, max %v", len(lat), lat[0], lat[len(lat)/2], lat[len(lat)-1])
}

func TestReloadAndSIGHUP(t *testing.T) {
	t.Parallel()
	w, d, c := demoDaemon(t, "open")
	before, _ := c.Chain(bg, "demo")

	// A new chain by SIGHUP; the unchanged open one is left alone.
	w.writeChain("other", strings.Replace(strings.Replace(demoChain, "key=demo", "key=other", 1), "/home/user/demo.luks", "/home/user/none.luks", 1))
	d.Process.Signal(syscall.SIGHUP)
	testkit.Eventually(w.t, "the new chain appears", 20*time.Second, func() bool {
		_, err := c.Chain(bg, "other")
		return err == nil
	})
	after, _ := c.Chain(bg, "demo")
	if after.State != "open" || !after.LastChange.Equal(before.LastChange) {
		t.Errorf("unchanged chain touched: %+v -> %+v", before, after)
	}
	// A broken file changes nothing.
	w.writeChain("broken", "key=\n")
	if _, err := c.Reload(bg); !dbusapi.IsErrorName(err, dbusapi.InvalidConfig) {
		t.Errorf("reload of a broken target: %v", err)
	}
	os.Remove(filepath.Join(w.conf, "demo", "broken.ini"))
	// Removing the open chain closes it and drops its object.
	os.Remove(filepath.Join(w.conf, "demo", "demo.ini"))
	if n, err := c.Reload(bg); err != nil || n != 1 {
		t.Fatalf("reload: %d %v", n, err)
	}
	testkit.Eventually(w.t, "the removed chain is gone", 30*time.Second, func() bool {
		_, err := c.Chain(bg, "demo")
		return err != nil
	})
	if out := string(w.sh("work", "ls /dev/mapper").Stdout); out != "" {
		t.Errorf("removed chain still open in work: %q", out)
	}
}

func TestPreOpenHookVetoesAndPostHooksRun(t *testing.T) {
	t.Parallel()
	w := newWorld(t, "4.2", permissiveBus)
	mark := filepath.Join(w.dir, "hooks.log")
	veto := filepath.Join(w.dir, "veto")
	if err := os.WriteFile(veto, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	w.writeChain("demo", demoChain+
		"pre open command=echo pre-open $QCRYPT_CHAIN $QCRYPT_TARGET_VM $QCRYPT_MOUNT_POINT >> "+mark+"; [ ! -e "+veto+" ]\n"+
		"post open command=echo post-open >> "+mark+"\n"+
		"pre close command=echo pre-close >> "+mark+"; false\n"+
		"post close command=echo post-close >> "+mark+"\n")
	if err := os.Chmod(filepath.Join(w.conf, "demo", "demo.ini"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := w.qubes.Start(bg, "work"); err != nil {
		t.Fatal(err)
	}
	w.startDaemon()
	c := w.client()
	ci := w.waitState(c, "demo", "failed", 30*time.Second)
	if !strings.Contains(ci.LastError, "pre open command vetoed") {
		t.Errorf("last error %q", ci.LastError)
	}
	if out := string(w.sh("sys-usb", "losetup -a").Stdout); out != "" {
		t.Errorf("vetoed open did something: %q", out)
	}
	if st, _ := w.qubes.CurrentState(bg, "mediator"); st != "Halted" {
		t.Errorf("vetoed open started mediator: %s", st)
	}
	os.Remove(veto)
	if r, err := c.RunJob(bg, c.Open("demo", chains.OpenOptions{}), nil); err != nil || !r.Success {
		t.Fatalf("open: %+v %v", r, err)
	}
	if r, err := c.RunJob(bg, c.Close("demo", chains.CloseOptions{}), nil); err != nil || !r.Success {
		t.Fatalf("close (a failing pre close command is ignored): %+v %v", r, err)
	}
	log, _ := os.ReadFile(mark)
	if got := string(log); got != "pre-open demo work /mnt/demo\npre-open demo work /mnt/demo\npost-open\npre-close\npost-close\n" {
		t.Errorf("hooks ran:\n%s", got)
	}
}

func TestCloseAllWithStop(t *testing.T) {
	t.Parallel()
	w, d, c := demoDaemon(t, "open")
	results, err := c.RunJobs(bg, c.CloseAll(chains.CloseOptions{}, true), nil)
	if err != nil || len(results) != 1 || !results[0].Success {
		t.Fatalf("close-all: %+v %v", results, err)
	}
	done := make(chan error)
	go func() { done <- d.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("qcryptd exited with %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("qcryptd did not stop")
	}
	if out := string(w.sh("work", "ls /dev/mapper").Stdout); out != "" {
		t.Errorf("chain still open after close-all: %q", out)
	}
}
