package bustest

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/dbusapi/dbustest"
	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

// The three attackers of docs/security.md: a user in group qubes (may use qcryptd), a
// user in no group (may only introspect), and a hostile qube (its tests are where its
// output is parsed). The users are real, so both the bus policy and qcryptd decide on
// what the bus says about them.

func credential(t *testing.T, name string) *syscall.Credential {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create users and run clients as them")
	}
	cred, err := dbustest.User(name)
	if err != nil {
		t.Fatal(err)
	}
	return cred
}

// as runs a command as a user (nil: as the test, root) on the world's bus; it returns
// combined output and the exit status.
func (w *world) as(cred *syscall.Credential, name string, args ...string) (string, int) {
	w.t.Helper()
	cmd := exec.Command(name, args...)
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	cmd.Env = []string{"PATH=/usr/bin:/bin", "DBUS_SYSTEM_BUS_ADDRESS=" + w.busAddr}
	cmd.Dir = "/"
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		w.t.Fatalf("%s: %v", name, err)
	}
	return string(out), cmd.ProcessState.ExitCode()
}

func (w *world) busctl(cred *syscall.Credential, args ...string) (string, int) {
	return w.as(cred, "busctl", append([]string{"--address=" + w.busAddr}, args...)...)
}

func TestCallerAccess(t *testing.T) {
	t.Parallel()
	policy, _ := filepath.Abs("../../systemd/org.qcrypt.Qcryptd1.conf")
	tests := map[string]struct {
		bus string
	}{
		// The bus lets everyone call: every refusal is qcryptd's own check.
		"by qcryptd": {bus: permissiveBus},
		// The stock system bus policy plus ours: refused before qcryptd sees the call.
		"by the bus policy": {bus: dbustest.SystemPolicy(policy)},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			quser, qsec := credential(t, dbustest.QUser), credential(t, dbustest.QSec)
			w := newWorld(t, "4.2", tc.bus)
			w.writeChain("demo", demoChain)
			w.startDaemon()
			ctl := bin(t, "qcryptctl")
			chainPath := string(dbusapi.ChainPath("demo"))

			// The user in no group: no state, no reads, no watching; introspection only.
			for _, args := range [][]string{{"list"}, {"status", "demo"}, {"watch"}, {"open", "demo"}, {"check", "demo"}} {
				if out, code := w.as(qsec, ctl, args...); code != 77 || !strings.Contains(strings.ToLower(out), "access denied") {
					t.Errorf("qsec: qcryptctl %v: exit %d %s", args, code, out)
				}
			}
			for _, args := range [][]string{
				{"get-property", dbusapi.BusName, chainPath, dbusapi.ChainInterface, "State"},
				{"get-property", dbusapi.BusName, string(dbusapi.ManagerPath), dbusapi.ManagerInterface, "Summary"},
				{"call", dbusapi.BusName, chainPath, "org.freedesktop.DBus.Properties", "GetAll", "s", dbusapi.ChainInterface},
				{"call", dbusapi.BusName, string(dbusapi.ManagerPath), "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"},
				{"call", dbusapi.BusName, string(dbusapi.ManagerPath), dbusapi.ManagerInterface, "Open", "sa{sv}", "demo", "0"},
			} {
				if out, code := w.busctl(qsec, args...); code == 0 || !strings.Contains(strings.ToLower(out), "access denied") {
					t.Errorf("qsec: busctl %v: exit %d %s", args, code, out)
				}
			}
			// Introspection: the shipped policy lets others send qcryptd nothing at all;
			// qcryptd itself shows them the interfaces, never the names of chains or jobs.
			directory := string(dbusapi.ManagerPath) + "/chain"
			out, code := w.busctl(qsec, "introspect", "--xml-interface", dbusapi.BusName, chainPath)
			if tc.bus == permissiveBus && (code != 0 || !strings.Contains(out, "StateChanged")) {
				t.Errorf("qsec cannot introspect a chain it names: exit %d %s", code, out)
			}
			if tc.bus != permissiveBus && (code == 0 || !strings.Contains(out, "Access denied")) {
				t.Errorf("the policy lets qsec introspect: exit %d %s", code, out)
			}
			for cred, want := range map[*syscall.Credential]bool{qsec: false, quser: true} {
				out, code := w.busctl(cred, "introspect", "--xml-interface", dbusapi.BusName, directory)
				if got := strings.Contains(out, `<node name="demo"/>`); got != want || (code != 0) != (cred == qsec && tc.bus != permissiveBus) {
					t.Errorf("uid %d introspects %s: exit %d, lists the chain: %v, want %v\n%s", cred.Uid, directory, code, got, want, out)
				}
			}

			// The user in group qubes: reads and acts, by the groups the bus reports.
			if out, code := w.as(quser, ctl, "list"); code != 0 || !strings.Contains(out, "demo") {
				t.Errorf("quser: qcryptctl list: exit %d %s", code, out)
			}
			if out, code := w.busctl(quser, "get-property", dbusapi.BusName, chainPath, dbusapi.ChainInterface, "State"); code != 0 || !strings.Contains(out, "waiting") {
				t.Errorf("quser: get-property: exit %d %s", code, out)
			}
			if out, code := w.busctl(quser, "call", dbusapi.BusName, string(dbusapi.ManagerPath), "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"); code != 0 || !strings.Contains(out, chainPath) {
				t.Errorf("quser: GetManagedObjects: exit %d %s", code, out)
			}

			// Group membership is what the bus reports of the connection, as the policy
			// sees it, not what /etc/group says of the uid: a process of quser without
			// the group is refused, one of qsec holding the group is let in.
			qubesGID := quser.Groups[len(quser.Groups)-1]
			for _, g := range quser.Groups {
				if g != quser.Gid {
					qubesGID = g
				}
			}
			dropped := &syscall.Credential{Uid: quser.Uid, Gid: quser.Gid, Groups: []uint32{quser.Gid}}
			if out, code := w.as(dropped, ctl, "list"); code != 77 {
				t.Errorf("quser without group qubes: exit %d %s", code, out)
			}
			holding := &syscall.Credential{Uid: qsec.Uid, Gid: qsec.Gid, Groups: []uint32{qsec.Gid, qubesGID}}
			if out, code := w.as(holding, ctl, "list"); code != 0 {
				t.Errorf("qsec holding group qubes: exit %d %s", code, out)
			}
		})
	}
}

// TestSignalsOnlyForQubes runs a probe that subscribes to every signal as each user;
// the bus policy must keep qcryptd's signals (chain states, reasons, job messages) from
// the user in no group, and deliver them to the user in group qubes (the control).
func TestSignalsOnlyForQubes(t *testing.T) {
	t.Parallel()
	quser, qsec := credential(t, dbustest.QUser), credential(t, dbustest.QSec)
	policy, _ := filepath.Abs("../../systemd/org.qcrypt.Qcryptd1.conf")
	w := newWorld(t, "4.2", dbustest.SystemPolicy(policy))
	w.writeChain("demo", demoChain)
	d := w.startDaemon()
	c := w.client()
	w.waitState(c, "demo", "waiting", 30*time.Second)

	type probe struct {
		lines chan string
		cmd   *exec.Cmd
	}
	start := func(cred *syscall.Credential) probe {
		cmd := exec.Command(bin(t, "sigprobe"))
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		cmd.Env = []string{"DBUS_SYSTEM_BUS_ADDRESS=" + w.busAddr}
		out, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); _ = cmd.Wait() })
		p := probe{lines: make(chan string, 4096), cmd: cmd}
		go func() {
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				p.lines <- sc.Text()
			}
			close(p.lines)
		}()
		if l := <-p.lines; l != "READY" {
			t.Fatalf("probe: %q", l)
		}
		return p
	}
	group, other := start(quser), start(qsec)

	// Chain and job signals, then qcryptd leaves: on each connection the bus delivers in
	// order, so a probe that saw the departure saw everything sent before it.
	if err := w.qubes.Start(bg, "work"); err != nil {
		t.Fatal(err)
	}
	w.waitState(c, "demo", "open", 60*time.Second)
	d.Process.Signal(syscall.SIGTERM)
	_ = d.Wait() // a signaled exit: the probes below say what matters
	collect := func(p probe) (fromQcryptd int, all []string) {
		deadline := time.After(2 * time.Minute)
		for done := false; !done; {
			select {
			case l, ok := <-p.lines:
				if !ok {
					done = true
					break
				}
				all = append(all, l)
				if !strings.HasPrefix(l, "org.freedesktop.DBus ") && l != "LEFT" {
					fromQcryptd++
				}
			case <-deadline:
				done = true
			}
		}
		if len(all) == 0 || all[len(all)-1] != "LEFT" {
			t.Errorf("probe did not see qcryptd leave: %q", all)
		}
		return fromQcryptd, all
	}
	if n, all := collect(group); n == 0 {
		t.Errorf("the user in group qubes received no signal of qcryptd (control): %q", all)
	}
	if n, all := collect(other); n != 0 {
		t.Errorf("the user in no group received %d signals of qcryptd: %q", n, all)
	}
}

// TestCheckOfADirectory: qcryptd reads only its own config root for others than root;
// qcryptctl checks any other directory with the caller's own rights.
func TestCheckOfADirectory(t *testing.T) {
	t.Parallel()
	quser := credential(t, dbustest.QUser)
	w := newWorld(t, "4.2", permissiveBus)
	w.writeChain("demo", demoChain)
	w.startDaemon()
	secret := filepath.Join(w.dir, "secret")
	if err := os.Mkdir(secret, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(secret, "x.ini"), []byte("root-only-words=42\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	if out, code := w.busctl(quser, "call", dbusapi.BusName, string(dbusapi.ManagerPath), dbusapi.ManagerInterface, "Check", "s", secret); code == 0 || !strings.Contains(out, "Access denied") {
		t.Errorf("quser's Check of a path: exit %d %s", code, out)
	}
	out, code := w.as(quser, bin(t, "qcryptctl"), "check", secret)
	if code == 0 || !strings.Contains(out, "permission denied") || strings.Contains(out, "root-only-words") {
		t.Errorf("quser's qcryptctl check: exit %d %s", code, out)
	}
	if out, code := w.as(quser, bin(t, "qcryptctl"), "check", "demo"); code != 0 {
		t.Errorf("quser's check of the daemon's target: exit %d %s", code, out)
	}
	// root may have qcryptd read it, and sees what is wrong in it.
	ok, errs, err := w.client().Check(bg, secret)
	if err != nil || ok || len(errs) == 0 || !strings.Contains(strings.Join(errs, "\n"), "root-only-words") {
		t.Errorf("root's check: %v %q %v", ok, errs, err)
	}
}

// TestCallerFilesAreOpenedByTheClient: qcryptd never opens a dom0 path a caller names.
// qcryptctl opens key files, entropy, the work file and backups with the caller's own
// rights and passes descriptors; the bus API has no path fields left to abuse.
func TestCallerFilesAreOpenedByTheClient(t *testing.T) {
	t.Parallel()
	quser := credential(t, dbustest.QUser)
	w := newWorld(t, "4.3", permissiveBus)
	// A configured chain that stays out of the way of the ad-hoc one on the demo container.
	w.writeChain("other", strings.NewReplacer("key=demo", "key=other", "demo.luks", "other.luks").Replace(demoChain))
	w.startDaemon()
	ctl := bin(t, "qcryptctl")
	adhoc := []string{"sys-usb", "/home/user/demo.luks", "demo", "mediator", "work"}
	if err := w.qubes.Start(bg, "work"); err != nil {
		t.Fatal(err)
	}

	// A root-only key file: quser cannot have it injected into work.
	secret := filepath.Join(w.dir, "root-only.key")
	if err := os.WriteFile(secret, []byte("root's secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, code := w.as(quser, ctl, append([]string{"open", "--inj", "work", secret}, adhoc...)...); code != 1 || !strings.Contains(out, "permission denied") {
		t.Errorf("quser --inj of a root-only file: exit %d %s", code, out)
	}
	// A directory quser may not write: no backup, no work file is made there.
	rootDir := filepath.Join(w.dir, "root-dir")
	if err := os.Mkdir(rootDir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, opt := range []string{"--bak", "--wd"} {
		args := append([]string{"luks-init", "-a", "--size", "48M", opt, filepath.Join(rootDir, "x")}, "sys-usb", "/home/user/q.luks", "q", "mediator", "work")
		if out, code := w.as(quser, ctl, args...); code != 1 || !strings.Contains(out, "permission denied") {
			t.Errorf("quser luks-init %s in root's directory: exit %d %s", opt, code, out)
		}
	}
	if entries, _ := os.ReadDir(rootDir); len(entries) != 0 {
		t.Errorf("files made in root's directory: %v", entries)
	}
	// Not even root can hand qcryptd a path: those fields are gone from the API.
	for _, field := range []string{"backup_dir", "work_dir", "key_entropy"} {
		out, code := w.busctl(nil, "call", dbusapi.BusName, string(dbusapi.ManagerPath), dbusapi.ManagerInterface, "LuksInit", "a{sv}", "5",
			"source_vm", "s", "sys-usb", "file", "s", "/home/user/p.luks", "key", "s", "p", "destinations", "as", "1", "work", field, "s", "/etc/cron.d")
		if code == 0 || !strings.Contains(out, "unknown spec field") && !strings.Contains(out, "want a file descriptor") {
			t.Errorf("LuksInit with %s as a path: exit %d %s", field, code, out)
		}
	}

	// The real thing, as root: the key removed from work comes back from the injected
	// descriptor, and luks-init's backups are the keys the qubes got.
	key := w.sh("work", "cat /home/user/.qcrypt/keys/demo; rm /home/user/.qcrypt/keys/demo").Stdout
	keyFile := filepath.Join(w.dir, "demo.key")
	if err := os.WriteFile(keyFile, key, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, code := w.qcryptctl(append([]string{"open", "--inj", "work", keyFile}, adhoc...)...); code != 0 {
		t.Fatalf("open with --inj: exit %d %s", code, out)
	}
	if got := w.sh("work", "cat /home/user/.qcrypt/keys/demo").Stdout; string(got) != string(key) {
		t.Errorf("injected key differs")
	}
	if out, code := w.qcryptctl(append([]string{"close"}, adhoc...)...); code != 0 {
		t.Fatalf("close: exit %d %s", code, out)
	}
	bak := filepath.Join(w.dir, "bak")
	if out, code := w.qcryptctl("luks-init", "-a", "--size", "48M", "--fs", "ext4", "--bak", bak, "--enkey", "/dev/urandom",
		"sys-usb", "/home/user/b.luks", "b", "mediator", "work"); code != 0 {
		t.Fatalf("luks-init: exit %d %s", code, out)
	}
	for _, vm := range []string{"mediator", "work"} {
		got, err := os.ReadFile(filepath.Join(bak, vm+"_b"))
		st, _ := os.Stat(filepath.Join(bak, vm+"_b"))
		inQube := w.sh(vm, "cat /home/user/.qcrypt/keys/b").Stdout
		if err != nil || len(got) != 100 || string(got) != string(inQube) || st.Mode().Perm() != 0o600 {
			t.Errorf("backup of %s: %d bytes, mode %v, equal to the qube's key: %v (%v)", vm, len(got), st.Mode(), string(got) == string(inQube), err)
		}
	}
	// A second luks-init refuses before anything happens: the backups exist.
	out, code := w.qcryptctl("luks-init", "-a", "--size", "48M", "--bak", bak, "sys-usb", "/home/user/c.luks", "b", "mediator", "work")
	if code != 1 || !strings.Contains(out, "exists already (never overwritten)") {
		t.Errorf("luks-init over backups: exit %d %s", code, out)
	}
}

// openDescriptors counts the descriptors of process pid.
func openDescriptors(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestDescriptorFloods: every descriptor a message brings qcryptd is closed, whatever
// the message (a ping, introspection, an unknown or refused call, a wrong signature, a
// descriptor named twice, a signal): after thousands of them, sent by a user in no group
// (on a bus that lets it through) and by a user in group qubes (the shipped policy),
// qcryptd holds as many descriptors as before and opens a chain for root.
func TestDescriptorFloods(t *testing.T) {
	t.Parallel()
	quser, qsec := credential(t, dbustest.QUser), credential(t, dbustest.QSec)
	policy, _ := filepath.Abs("../../systemd/org.qcrypt.Qcryptd1.conf")
	tests := map[string]struct {
		bus  string
		cred *syscall.Credential
	}{
		"a user in no group":                        {bus: permissiveBus, cred: qsec},
		"a user in group qubes, the shipped policy": {bus: dbustest.SystemPolicy(policy), cred: quser},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			w := newWorld(t, "4.2", tc.bus)
			w.writeChain("other", strings.NewReplacer("key=demo", "key=other", "demo.luks", "other.luks").Replace(demoChain))
			d := w.startDaemon()
			pid := d.Process.Pid
			// The baseline once qcryptd has settled: connected to qubesd (its event
			// stream open) and the chain reconciled.
			w.waitState(w.client(), "other", "waiting", time.Minute)
			base := openDescriptors(t, pid)
			out, code := w.as(tc.cred, bin(t, "fdflood"), "200")
			if code != 0 || !strings.Contains(out, "sent 3000 messages with 16 descriptors each") {
				t.Fatalf("fdflood: exit %d %s", code, out)
			}
			t.Logf("fdflood: %s", strings.TrimSpace(out))
			// Each is closed before its answer goes out; the daemon's own work may hold a
			// descriptor or two for a moment.
			n := base
			if !testkit.Within(time.Minute, func() bool { n = openDescriptors(t, pid); return n <= base }) {
				t.Fatalf("qcryptd holds %d descriptors after the flood, %d before", n, base)
			}
			adhoc := []string{"sys-usb", "/home/user/demo.luks", "demo", "mediator", "work"}
			if out, code := w.qcryptctl(append([]string{"open", "-a"}, adhoc...)...); code != 0 {
				t.Fatalf("root's open after the flood: exit %d %s", code, out)
			}
			if out, code := w.qcryptctl(append([]string{"close"}, adhoc...)...); code != 0 {
				t.Fatalf("root's close after the flood: exit %d %s", code, out)
			}
		})
	}
}

// TestBigArgumentsAreNotEchoed: every method given an 8 MB string where a name, a path
// or a word goes answers with a short error, and a spec with 100,000 destinations is
// refused as too many layers (qcryptd holds nothing of it).
func TestBigArgumentsAreNotEchoed(t *testing.T) {
	t.Parallel()
	w := newWorld(t, "4.2", permissiveBus)
	w.writeChain("demo", demoChain)
	w.startDaemon()
	conn, err := dbus.Connect(w.busAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	mgr := conn.Object(dbusapi.BusName, dbusapi.ManagerPath)
	big := strings.Repeat("A", 8<<20)
	v := dbus.MakeVariant
	spec := func(field string, value any) map[string]dbus.Variant {
		m := map[string]dbus.Variant{"source_vm": v("sys-usb"), "file": v("/home/user/x.luks"), "key": v("x"),
			"destinations": v([]string{"mediator", "work"})}
		m[field] = v(value)
		return m
	}
	many := make([]string, 100000)
	for i := range many {
		many[i] = fmt.Sprintf("q%d", i)
	}
	none := map[string]dbus.Variant{}
	calls := map[string]struct {
		method string
		args   []any
		want   string // in the error
	}{
		"Open of a chain":       {"Open", []any{big, none}, "no chain"},
		"Status of a chain":     {"Status", []any{big}, "no chain"},
		"an option's name":      {"Open", []any{"demo", map[string]dbus.Variant{big: v(true)}}, "unknown option"},
		"Plan's operation":      {"Plan", []any{big, "demo", none, none}, "is not open or close"},
		"a source qube":         {"OpenAdhoc", []any{spec("source_vm", big), none}, "source vm"},
		"a file":                {"OpenAdhoc", []any{spec("file", "/"+big), none}, "longer than 4095 bytes"},
		"a relative file":       {"StatusAdhoc", []any{spec("file", big)}, "must be absolute"},
		"a key id":              {"CloseAdhoc", []any{spec("key", big), none}, "key id"},
		"a destination":         {"OpenAdhoc", []any{spec("destinations", []string{"mediator", big}), none}, "destination vm 2"},
		"a mount point":         {"OpenAdhoc", []any{spec("mount_point", "/"+big), none}, "longer than 4095 bytes"},
		"cryptsetup options":    {"OpenAdhoc", []any{spec("crypt_options", map[string]string{"work": "--cipher " + big}), none}, "bad value"},
		"a key store":           {"OpenAdhoc", []any{spec("inject_keystore", map[string]string{"work": "/" + big + "*"}), none}, "key store directory"},
		"a file system":         {"LuksInit", []any{spec("fs", big)}, "file system"},
		"a check target":        {"Check", []any{big}, ""},
		"a key store to unlock": {"KeystoreUnlock", []any{"/" + big + "*"}, "key store directory"},
		"too many layers":       {"OpenAdhoc", []any{spec("destinations", many), none}, "at most 32 layers, this one has 100000"},
	}
	c := w.client()
	jobsBefore, err := c.Jobs(bg)
	if err != nil {
		t.Fatal(err)
	}
	for name, tc := range calls {
		t.Run(name, func(t *testing.T) {
			err := mgr.Call(dbusapi.ManagerInterface+"."+tc.method, 0, tc.args...).Err
			var de dbus.Error
			if !errors.As(err, &de) {
				if tc.method == "Check" && err == nil {
					return // an invalid target is a check result, not an error
				}
				t.Fatalf("%s: %v, want an error", tc.method, err)
			}
			msg := fmt.Sprint(de.Body...)
			if len(msg) > 1024 || !strings.Contains(msg, tc.want) {
				t.Errorf("%s answered %s with %d bytes, want at most 1024 saying %q: %.300s", tc.method, de.Name, len(msg), tc.want, msg)
			}
		})
	}
	// The refusals left nothing: no chain object, no job.
	if list, err := c.Chains(bg); err != nil || len(list) != 1 {
		t.Errorf("chains after the refusals: %v %v", list, err)
	}
	if jobs, err := c.Jobs(bg); err != nil || len(jobs) != len(jobsBefore) {
		t.Errorf("jobs after the refusals: %v %v, before %v", jobs, err, jobsBefore)
	}
}
