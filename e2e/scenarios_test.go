package e2e_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/simtest"
	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

// The scenarios share one chain, "vault": a container in sys-usb, outer layer opened by
// mediator, inner by work, mounted at /mnt/vault. Real LUKS2 with real argon2 would take
// seconds per key slot under qemu's TCG, so luks-init is told pbkdf2 with 1000
// iterations (qcryptd's own default stays argon2id).

const fastKDF = "--pbkdf pbkdf2 --pbkdf-force-iterations 1000"

var vaultChain = `source vm=sys-usb
source file=/home/user/vault.luks
key=vault
destination vm 1=mediator
destination vm 2=work
destination mount point=/mnt/vault
read-only=false
startup interval=0
`

var marker = func() []byte {
	b := make([]byte, 16)
	rand.Read(b)
	return []byte("qcrypt-e2e-marker-" + hex.EncodeToString(b))
}()

// TestLuksInitOpenWriteReopen: luks-init of a 2-layer chain (48 MiB: each LUKS2 header
// takes 16 MiB, 16 MiB are left for ext4), open with mount, write a
// marker, close, reopen, the file's checksum matches. The chain stays open for the next
// test.
func TestLuksInitOpenWriteReopen(t *testing.T) {
	if err := h.q.Start(context.Background(), "work"); err != nil {
		t.Fatal(err)
	}
	mustCtl(t, "luks-init", "--autostart", "--size", "48M", "--fs", "ext4", "--cy", "mediator", fastKDF, "--cy", "work", fastKDF,
		"sys-usb", "/home/user/vault.luks", "vault", "mediator", "work")
	writeChain(t, "vault", vaultChain)
	mustCtl(t, "open", "vault")
	res := sh(t, "work", fmt.Sprintf("printf %%s %s > /mnt/vault/marker && sync && sha256sum /mnt/vault/marker", marker))
	if res.ExitCode != 0 {
		t.Fatalf("cannot write the marker in work: %s", res.Stderr)
	}
	sum := string(res.Stdout)
	mustCtl(t, "close", "vault")
	requireClean(t, "after close")
	mustCtl(t, "open", "vault")
	if got := string(sh(t, "work", "sha256sum /mnt/vault/marker").Stdout); got != sum {
		t.Fatalf("after reopen the marker's checksum is %q, want %q", got, sum)
	}
}

// TestDetachInUseRefused: like Xen, the simulator refuses to take a device away from a
// qube that has it open (work's mounted layer); the chain keeps working.
func TestDetachInUseRefused(t *testing.T) {
	if st := chainInfo(t, "vault").State; st != "open" {
		t.Fatalf("the chain must be open (left so by the first test), is %s", st)
	}
	atts, err := h.q.Attached(context.Background(), "work")
	if err != nil || len(atts) != 1 || atts[0].Backend != "mediator" {
		t.Fatalf("work's attachments: %+v %v", atts, err)
	}
	if err := h.q.Detach(context.Background(), "work", atts[0].DeviceRef); err == nil {
		t.Error("detaching the device work has mounted succeeded")
	}
	checkMarker(t, "after the refused detach")
}

// TestPlaintextOnlyInTarget checks the security property byte-wise, reading files and
// devices from outside the qubes: the container in sys-usb, what mediator is given and
// what it produces, and what work is given do not hold the marker; only work's
// decrypted device does (the positive control that the search works). Keys are only in
// their own qubes; dom0 holds neither keys nor plaintext.
func TestPlaintextOnlyInTarget(t *testing.T) {
	if st := chainInfo(t, "vault").State; st != "open" {
		t.Fatalf("the chain must be open (left so by the first test), is %s", st)
	}
	if out := mustCtl(t, "status", "vault"); !strings.Contains(out, "vault: open (0 steps missing)") {
		t.Errorf("qcryptctl status of the open chain:\n%s", out)
	}
	// Inside work, cryptsetup shows the plain names a real qube has.
	if st := string(sh(t, "work", "cryptsetup status vault").Stdout); !regexp.MustCompile(`(?s)^/dev/mapper/vault is active.*device:\s+/dev/xvd[a-z]\n`).MatchString(st) {
		t.Errorf("cryptsetup status in work:\n%s", st)
	}
	dms := dmDevices()
	layer := func(prefix string) string {
		for name, dev := range dms {
			if strings.HasPrefix(name, prefix) {
				return dev
			}
		}
		t.Fatalf("no device-mapper device %s* in %v", prefix, dms)
		return ""
	}
	for _, c := range []struct {
		what, path string
		want       bool
	}{
		{"the container file in sys-usb", filepath.Join(h.vmRoot("sys-usb"), "home/user/vault.luks"), false},
		{"the device attached to mediator", layer("att#mediator#"), false},
		{"the device mediator decrypts to", layer("mediator:vault"), false},
		{"the device attached to work", layer("att#work#"), false},
		{"the device work decrypts to", layer("work:vault"), true},
	} {
		if got := contains(t, c.path, marker); got != c.want {
			t.Errorf("%s (%s): holds the marker = %v, want %v", c.what, c.path, got, c.want)
		}
	}
	for _, owner := range []string{"mediator", "work"} {
		key, err := os.ReadFile(filepath.Join(h.vmRoot(owner), "home/user/.qcrypt/keys/vault"))
		if err != nil || len(key) < 16 {
			t.Fatalf("key of %s: %v", owner, err)
		}
		for _, vm := range []string{"dom0", "sys-usb", "mediator", "work"} {
			hits := treeContains(t, h.vmRoot(vm), key)
			if vm == owner && len(hits) != 1 || vm != owner && len(hits) != 0 {
				t.Errorf("the key of %s is in %s's files: %v", owner, vm, hits)
			}
		}
	}
	if hits := treeContains(t, h.vmRoot("dom0"), marker); len(hits) > 0 {
		t.Errorf("dom0 holds plaintext: %v", hits)
	}
	if hits := treeContains(t, filepath.Join(h.dir, "state"), marker); len(hits) > 0 {
		t.Errorf("qcryptd's state holds plaintext: %v", hits)
	}
	for name := range dms {
		if strings.HasPrefix(name, "dom0:") {
			t.Errorf("dom0 has a device-mapper device: %s", name)
		}
	}
	mustCtl(t, "close", "vault")
	requireClean(t, "after close")
}

// TestReadOnlyChain: a read-only chain mounts read-only; writes to the file system and
// to the decrypted device fail in work.
func TestReadOnlyChain(t *testing.T) {
	ensureClosed(t)
	writeChain(t, "vault", strings.Replace(vaultChain, "read-only=false", "read-only=true", 1))
	defer writeChain(t, "vault", vaultChain)
	mustCtl(t, "open", "vault")
	if res := sh(t, "work", "touch /mnt/vault/new"); res.ExitCode == 0 {
		t.Error("a write to the read-only file system succeeded")
	}
	if res := sh(t, "work", "dd if=/dev/zero of=/dev/mapper/vault bs=512 count=1 conv=notrunc 2>&1"); res.ExitCode == 0 {
		t.Error("a write to the read-only decrypted device succeeded")
	}
	checkMarker(t, "on the read-only chain")
	mustCtl(t, "close", "vault")
	requireClean(t, "after close")
}

// TestWrongKey: with a wrong key in work, open fails naming the key and leaves no dm
// device, loop device or attachment behind.
func TestWrongKey(t *testing.T) {
	ensureClosed(t)
	keyPath := filepath.Join(h.vmRoot("work"), "home/user/.qcrypt/keys/vault")
	good, err := os.ReadFile(keyPath)
	if err != nil {
		t.Fatal(err)
	}
	bad := append([]byte(nil), good...)
	bad[0] ^= 0xff
	if err := os.WriteFile(keyPath, bad, 0o600); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := os.WriteFile(keyPath, good, 0o600); err != nil {
			t.Errorf("cannot put the good key back: %v", err)
		}
	}()
	out, code := ctl(t, "open", "vault")
	if code == 0 || !strings.Contains(out, "wrong key") {
		t.Errorf("open with a wrong key: exit %d, output %q; want a failure naming the wrong key", code, out)
	}
	requireClean(t, "after the failed open")
}

// TestAutoOpenOnStartAndCloseOnShutdown: qcryptd opens the chain when work starts and
// closes it when work shuts down.
func TestAutoOpenOnStartAndCloseOnShutdown(t *testing.T) {
	ensureClosed(t)
	ctx := context.Background()
	if err := h.q.Shutdown(ctx, "work", false, true); err != nil {
		t.Fatal(err)
	}
	waitState(t, "vault", 30*time.Second, "waiting")
	if err := h.q.Start(ctx, "work"); err != nil {
		t.Fatal(err)
	}
	waitState(t, "vault", 2*time.Minute, "open")
	checkMarker(t, "after the automatic open")
	if err := h.q.Shutdown(ctx, "work", false, true); err != nil {
		t.Fatal(err)
	}
	waitState(t, "vault", time.Minute, "waiting")
	requireClean(t, "after work shut down")
	if err := h.q.Start(ctx, "work"); err != nil {
		t.Fatal(err)
	}
	waitState(t, "vault", 2*time.Minute, "open")
	mustCtl(t, "close", "vault")
	requireClean(t, "after close")
}

// TestAutoOpenOnPlug: the container on a USB disk (an ext4 image with a label) is opened
// when the disk is plugged into sys-usb, through its /dev/disk/by-label link.
func TestAutoOpenOnPlug(t *testing.T) {
	ensureClosed(t)
	stick := filepath.Join(h.dir, "stick")
	if err := os.MkdirAll(stick, 0o755); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(filepath.Join(h.vmRoot("sys-usb"), "home/user/vault.luks"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(stick, "vault.luks"), data, 0o600); err != nil {
		t.Fatal(err)
	}
	image := filepath.Join(h.dir, "usb.img")
	if out, err := exec.Command("mkfs.ext4", "-q", "-L", "QCRYPTUSB", "-d", stick, image, "80M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	writeChain(t, "vault", strings.Replace(vaultChain, "source file=/home/user/vault.luks\n",
		"source device=/dev/disk/by-label/QCRYPTUSB\nsource mount point=/mnt/usb\nsource file=vault.luks\n", 1))
	defer writeChain(t, "vault", vaultChain)
	// Before the plug the reloaded chain waits for the disk.
	waitState(t, "vault", time.Minute, "waiting")
	if info := chainInfo(t, "vault"); !strings.Contains(info.Waiting, "QCRYPTUSB") {
		t.Fatalf("the chain waits for %q, not for the disk", info.Waiting)
	}
	out, err := h.simctl("plug", "sys-usb", image)
	if err != nil {
		t.Fatalf("plug: %v: %s", err, out)
	}
	port := strings.TrimSpace(out)
	waitState(t, "vault", 2*time.Minute, "open")
	checkMarker(t, "from the USB disk")
	mustCtl(t, "close", "--eject", "vault")
	if out, err := h.simctl("unplug", "sys-usb", port); err != nil {
		t.Fatalf("unplug %s: %v: %s", port, err, out)
	}
	requireClean(t, "after close and unplug")
}

// holdOpenInAttach starts `qcryptctl open vault` with the attach to work held back by
// the simulator's own qubesd, and returns once mediator has decrypted its layer.
func holdOpenInAttach(t *testing.T) *exec.Cmd {
	t.Helper()
	t.Cleanup(func() { h.mustSimctl(t, "clear-faults") })
	if out, err := h.simctl("fault", "admin.vm.device.block.Attach", "delay", "6000", "work"); err != nil {
		t.Fatalf("fault: %v: %s", err, out)
	}
	cmd := exec.Command(filepath.Join(h.bin, "qcryptctl"), "open", "vault")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitMediatorLayer(t)
	return cmd
}

// holdAutoOpenInWork starts work with its agent not answering, so the automatic open
// decrypts layer 1 and then waits in work (until the fault is cleared). Any qubesd,
// the real one too: nothing is delayed in qubesd. (A manual open would ask work first.)
func holdAutoOpenInWork(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	if err := h.q.Shutdown(ctx, "work", false, true); err != nil {
		t.Fatal(err)
	}
	waitState(t, "vault", time.Minute, "waiting")
	t.Cleanup(func() { h.mustSimctl(t, "qrexec-fault", "work", "none") })
	if out, err := h.simctl("qrexec-fault", "work", "hang"); err != nil {
		t.Fatalf("qrexec-fault: %v: %s", err, out)
	}
	if err := h.q.Start(ctx, "work"); err != nil {
		t.Fatal(err)
	}
	waitMediatorLayer(t)
}

func waitMediatorLayer(t *testing.T) {
	t.Helper()
	if !testkit.Within(time.Minute, func() bool { _, ok := dmDevices()["mediator:vault"]; return ok }) {
		t.Fatal("mediator never decrypted its layer")
	}
}

// TestMediatorKilledMidOpen: mediator is killed while the open waits for the attach
// to work; the open fails and rolls back: no dm, loop device or attachment is left.
func TestMediatorKilledMidOpen(t *testing.T) {
	if h.real {
		t.Skip("the open must be held in qubesd's attach, which only the simulator's own qubesd can delay")
	}
	ensureClosed(t)
	cmd := holdOpenInAttach(t)
	if err := h.q.Kill(context.Background(), "mediator"); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err == nil {
		t.Error("the open succeeded although mediator was killed in the middle")
	}
	waitState(t, "vault", time.Minute, "closed", "waiting", "failed")
	requireClean(t, "after the interrupted open")
	h.mustSimctl(t, "clear-faults")
	mustCtl(t, "open", "vault")
	mustCtl(t, "close", "vault")
	requireClean(t, "after a clean open and close")
}

// TestDaemonKilledMidOpen: qcryptd is killed (SIGKILL) in the middle of an open and
// started again; it reconciles from its journal and the real state: it rolls the half
// open chain back, opens it afresh, and after a close nothing is left.
func TestDaemonKilledMidOpen(t *testing.T) {
	ensureClosed(t)
	holdAutoOpenInWork(t)
	causes := watchCauses(t, "vault")
	h.daemon.Process.Signal(syscall.SIGKILL)
	_ = h.daemon.Wait() // ended by a signal we sent; its status is not the point
	h.mustSimctl(t, "qrexec-fault", "work", "none")
	if err := h.startDaemon(); err != nil {
		t.Fatal(err)
	}
	// The journal holds an open that stopped after layer 1 and the chain is partly open:
	// the only right decision is to roll it back (not to take it as open, nor to call it
	// degraded). The chain is eligible (sys-usb and work run), so it then opens afresh.
	deadline := time.After(2 * time.Minute)
	for reconciled := false; !reconciled; {
		select {
		case cause := <-causes:
			switch cause {
			case dbusapi.CauseRollBack:
				reconciled = true
			case dbusapi.CauseFoundOpen, dbusapi.CauseFinishClose, dbusapi.CauseError:
				t.Fatalf("the restarted qcryptd reconciled with %s, want %s", cause, dbusapi.CauseRollBack)
			}
		case <-deadline:
			t.Fatal("the restarted qcryptd did not roll the interrupted open back")
		}
	}
	waitState(t, "vault", 2*time.Minute, "open")
	checkMarker(t, "on the chain reopened after the roll back")
	mustCtl(t, "close", "vault")
	requireClean(t, "after reconcile and close")
}

// TestCycles: open/write/close cycles (E2E_CYCLES, default 8 in make check; make soak
// runs more), each writing a file of random data; after every reopen every earlier file
// reads back with its checksum.
func TestCycles(t *testing.T) {
	ensureClosed(t)
	cycles := 8
	if n, err := strconv.Atoi(os.Getenv("E2E_CYCLES")); err == nil && n > 0 {
		cycles = n
	}
	simtest.Cycles(t, cycles, "/mnt/vault", func() { mustCtl(t, "open", "vault") }, func() { mustCtl(t, "close", "vault") },
		func(script string) qubes.Result { return sh(t, "work", script) })
	requireClean(t, "at the end")
}

// ensureClosed closes the chain if an earlier test left it open, so that each test
// starts from a closed chain whatever ran before it.
func ensureClosed(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(h.conf, target, "vault.ini")); err != nil {
		return // not configured: the test runs alone (E2E_RUN)
	}
	if st := chainInfo(t, "vault").State; st != "closed" && st != "waiting" {
		mustCtl(t, "close", "vault")
	}
	requireClean(t, "before the test")
}

// checkMarker fails the test unless work reads the marker from the open chain.
func checkMarker(t *testing.T, when string) {
	t.Helper()
	if res := sh(t, "work", "cat /mnt/vault/marker"); string(res.Stdout) != string(marker) {
		t.Errorf("%s: the marker reads %q (stderr %q)", when, res.Stdout, res.Stderr)
	}
}

// TestLuksInitBtrfsOneLayer: luks-init's default file system, btrfs with zstd
// compression, on a 1-layer chain (sys-usb → work) opened ad hoc; the data survives a
// close and reopen, and the container holds no plaintext.
func TestLuksInitBtrfsOneLayer(t *testing.T) {
	ensureClosed(t)
	adhoc := []string{"sys-usb", "/home/user/b.luks", "bkey", "work"}
	// 16 MiB of LUKS2 header and btrfs' minimum of about 109 MiB.
	mustCtl(t, append([]string{"luks-init", "--autostart", "--size", "128M", "--cy", "work", fastKDF}, adhoc...)...)
	mustCtl(t, append([]string{"open", "--mp", "/mnt/b"}, adhoc...)...)
	res := sh(t, "work", fmt.Sprintf("findmnt -n -o FSTYPE /mnt/b && btrfs property get /mnt/b compression && head -c 65536 /dev/urandom > /mnt/b/r && printf %%s %s > /mnt/b/marker && sync && sha256sum /mnt/b/r", marker))
	lines := strings.Split(string(res.Stdout), "\n")
	if res.ExitCode != 0 || len(lines) < 3 || lines[0] != "btrfs" || lines[1] != "compression=zstd" {
		t.Fatalf("the new container in work: exit %d, output %q, stderr %q", res.ExitCode, res.Stdout, res.Stderr)
	}
	mustCtl(t, append([]string{"close"}, adhoc...)...)
	requireClean(t, "after close")
	if contains(t, filepath.Join(h.vmRoot("sys-usb"), "home/user/b.luks"), marker) {
		t.Error("the container file holds the marker")
	}
	mustCtl(t, append([]string{"open", "--mp", "/mnt/b"}, adhoc...)...)
	if got := string(sh(t, "work", "sha256sum /mnt/b/r").Stdout); got != lines[2]+"\n" {
		t.Errorf("after reopen: %q, want %q", got, lines[2])
	}
	mustCtl(t, append([]string{"close"}, adhoc...)...)
	requireClean(t, "at the end")
}

// TestKeystoreInjection: work lost its key; the chain file injects it from a blib key
// store in dom0, made the original's way with the real tools. While the store is
// locked the chain waits with the cause keystore-locked; `qcryptctl keystore unlock`
// (the password on its standard input, as qcryptd's question is answered) refuses a
// wrong password and changes nothing, and with the right one the chain opens by itself
// and work reads its data; an ad-hoc open with --inj work keystore://DIR does the same.
// The store is locked and work's key put back at the end.
func TestKeystoreInjection(t *testing.T) {
	if _, err := os.Stat(filepath.Join(h.conf, target, "vault.ini")); err != nil {
		t.Skip("needs the vault chain of TestLuksInitOpenWriteReopen")
	}
	ensureClosed(t)
	const store, password = "/srv/qcrypt-keys", "master password"
	keyPath := filepath.Join(h.vmRoot("work"), "home/user/.qcrypt/keys/vault")
	key, err := os.ReadFile(keyPath)
	if err != nil {
		t.Fatal(err)
	}
	// The store as the original makes it (dom0's file system is the simulator's dom0 root).
	dir := filepath.Join(h.vmRoot("dom0"), store)
	originalMakeStore(t, dir, password, fastKDF, map[string][]byte{"work_vault.key": key})
	if err := os.Remove(keyPath); err != nil {
		t.Fatal(err)
	}
	defer func() {
		mustCtl(t, "keystore", "lock", store)
		if err := os.WriteFile(keyPath, key, 0o600); err != nil {
			t.Errorf("cannot put work's key back: %v", err)
		}
		// The restored file is a new chain: with its qubes running it opens; close it.
		writeChain(t, "vault", vaultChain)
		waitState(t, "vault", 2*time.Minute, dbusapi.ChainOpen)
		mustCtl(t, "close", "vault")
		requireClean(t, "at the end")
	}()

	if st, err := h.q.CurrentState(context.Background(), "work"); err != nil || st != "Running" {
		if err := h.q.Start(context.Background(), "work"); err != nil {
			t.Fatal(err)
		}
	}
	writeChain(t, "vault", vaultChain+"destination inj 2=keystore://"+store+"\n")
	if !testkit.Within(2*time.Minute, func() bool { return strings.Contains(chainInfo(t, "vault").Waiting, "key store "+store) }) {
		ci := chainInfo(t, "vault")
		t.Fatalf("vault: %s %q (%s), want waiting for the key store", ci.State, ci.Waiting, ci.LastError)
	}
	unlock := func(password string) (string, int) { return keystoreCtl(t, password+"\n", "unlock", store) }
	if out, code := unlock("wrong"); code == 0 || !strings.Contains(out, "wrong password") {
		t.Errorf("unlock with a wrong password: exit %d %q", code, out)
	}
	if out := mustCtl(t, "keystore", "status", store); !strings.Contains(out, store+": locked") {
		t.Errorf("after a wrong password: %q", out)
	}
	if out, code := unlock(password); code != 0 {
		t.Fatalf("unlock: exit %d %q", code, out)
	}
	waitState(t, "vault", 2*time.Minute, dbusapi.ChainOpen)
	checkMarker(t, "opened with the injected key")
	if got, err := os.ReadFile(keyPath); err != nil || !bytes.Equal(got, key) {
		t.Errorf("work's key after the injection: %v", err)
	}
	mustCtl(t, "close", "vault")

	// Ad hoc, as the original's --inj VM keystore://DIR (the store is unlocked: no question).
	if err := os.Remove(keyPath); err != nil {
		t.Fatal(err)
	}
	adhoc := []string{"sys-usb", "/home/user/vault.luks", "vault", "mediator", "work"}
	mustCtl(t, append([]string{"open", "--inj", "work", "keystore://" + store, "--mp", "/mnt/vault"}, adhoc...)...)
	checkMarker(t, "opened ad hoc with the injected key")
	if got, err := os.ReadFile(keyPath); err != nil || !bytes.Equal(got, key) {
		t.Errorf("work's key after the ad-hoc injection: %v", err)
	}
	mustCtl(t, append([]string{"close"}, adhoc...)...)
}

// keystoreCtl runs qcryptctl keystore ARGS....
func keystoreCtl(t *testing.T, input string, args ...string) (string, int) {
	t.Helper()
	return ctlWithInput(t, input, append([]string{"keystore"}, args...)...)
}

// TestKeystoreInit: qcryptctl keystore init makes a store in dom0 with the new password
// given twice (a differing second one makes nothing), leaves it unlocked, refuses to
// make one over it, and the store opens the original's way with that password.
func TestKeystoreInit(t *testing.T) {
	const store = "/srv/qcrypt-new-store"
	dir := filepath.Join(h.vmRoot("dom0"), store)
	if out, code := keystoreCtl(t, "one\ntwo\n", "init", store); code == 0 || !strings.Contains(out, "differ") {
		t.Errorf("init with two different passwords: exit %d %q", code, out)
	}
	if _, err := os.Stat(filepath.Join(dir, "keys.lks")); err == nil {
		t.Fatal("a store was made although the passwords differed")
	}
	if out, code := keystoreCtl(t, "new pass\nnew pass\n", "init", store); code != 0 {
		t.Fatalf("init: exit %d %q", code, out)
	}
	defer mustCtl(t, "keystore", "lock", store)
	if out := mustCtl(t, "keystore", "status", store); !strings.Contains(out, store+": unlocked") {
		t.Errorf("after init: %q", out)
	}
	if out, code := keystoreCtl(t, "", "init", store); code == 0 || !strings.Contains(out, "exists") {
		t.Errorf("init over a store: exit %d %q", code, out)
	}
	mustCtl(t, "keystore", "lock", store)
	// The original's way opens it with that password and finds qcrypt's directory.
	withOriginalStore(t, dir, "new pass", func(root string) {
		if st, err := os.Stat(filepath.Join(root, "qcrypt")); err != nil || !st.IsDir() {
			t.Errorf("qcrypt/ in the store: %v", err)
		}
	})
}

// TestLuksInitKeystore: luks-init --keystore DIR with no store there creates it (the new
// password given twice) and keeps each destination's key in it under the original's
// names: the store, opened the original's way, holds the very keys the qubes got.
func TestLuksInitKeystore(t *testing.T) {
	const store = "/srv/qcrypt-luks-init-store"
	adhoc := []string{"sys-usb", "/home/user/li.luks", "likey", "mediator", "work"}
	out, code := ctlWithInput(t, "store pass\nstore pass\n", append([]string{"luks-init", "--autostart", "--size", "48M", "--fs", "ext4",
		"--cy", "mediator", fastKDF, "--cy", "work", fastKDF, "--keystore", store}, adhoc...)...)
	if code != 0 {
		t.Fatalf("luks-init --keystore: exit %d %q", code, out)
	}
	defer func() {
		for vm, p := range map[string]string{"sys-usb": "home/user/li.luks", "mediator": "home/user/.qcrypt/keys/likey", "work": "home/user/.qcrypt/keys/likey"} {
			_ = os.Remove(filepath.Join(h.vmRoot(vm), p))
		}
	}()
	mustCtl(t, "keystore", "lock", store)
	for _, vm := range []string{"mediator", "work"} {
		key, err := os.ReadFile(filepath.Join(h.vmRoot(vm), "home/user/.qcrypt/keys/likey"))
		if err != nil {
			t.Fatal(err)
		}
		if got := originalReadKey(t, filepath.Join(h.vmRoot("dom0"), store), "store pass", vm+"_likey.key"); !bytes.Equal(got, key) {
			t.Errorf("the store's key of %s differs from the one the qube got", vm)
		}
	}
	requireClean(t, "at the end")
}

// TestLayerCipherRefused: a 2-layer container whose outer layer uses AES-CBC-ESSIV, which
// the default list does not allow. mediator reports what its kernel runs (dmsetup table)
// in the call that opened the layer and closes it again: the open fails naming layer 1
// and the cipher, and nothing stays open. Allowed for that chain (--ciphers), it opens;
// the status shows each layer's cipher and the plaintext is mounted nosuid,nodev.
func TestLayerCipherRefused(t *testing.T) {
	ensureClosed(t)
	adhoc := []string{"sys-usb", "/home/user/cbc.luks", "cbc", "mediator", "work"}
	mustCtl(t, append([]string{"luks-init", "--autostart", "--size", "48M", "--fs", "ext4",
		"--cy", "mediator", fastKDF + " --cipher aes-cbc-essiv:sha256 --key-size 256", "--cy", "work", fastKDF}, adhoc...)...)
	out, code := ctl(t, append([]string{"open", "--mp", "/mnt/cbc"}, adhoc...)...)
	if code == 0 || !strings.Contains(out, "layer 1 uses aes-cbc-essiv:sha256 with a 256-bit key") {
		t.Fatalf("open of a layer with a cipher not allowed: exit %d %s", code, out)
	}
	requireClean(t, "after the refused open")
	mustCtl(t, append([]string{"open", "--mp", "/mnt/cbc", "--ciphers", "mediator", "aes-cbc-essiv:sha256"}, adhoc...)...)
	status := mustCtl(t, append([]string{"status", "--"}, adhoc...)...)
	for _, want := range []string{"yes (aes-cbc-essiv:sha256 with a 256-bit key)", "yes (aes-xts-plain64 with a 512-bit key)"} {
		if !strings.Contains(status, want) {
			t.Errorf("status does not show %q:\n%s", want, status)
		}
	}
	if got := string(sh(t, "work", "findmnt -n -o OPTIONS /mnt/cbc").Stdout); !strings.Contains(got, "nosuid") || !strings.Contains(got, "nodev") {
		t.Errorf("the plaintext is mounted with %q, want nosuid,nodev", got)
	}
	mustCtl(t, append([]string{"close"}, adhoc...)...)
	requireClean(t, "at the end")
}
