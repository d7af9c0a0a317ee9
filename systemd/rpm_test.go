package systemd

import (
	"bytes"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

// need skips a test without tool, or fails it under make (make deps installs it).
func need(t *testing.T, tool string) {
	t.Helper()
	if _, err := exec.LookPath(tool); err != nil {
		if os.Getenv("QCRYPT_REQUIRE_SANDBOX") == "1" {
			t.Fatalf("%s is needed (make deps)", tool)
		}
		t.Skipf("no %s", tool)
	}
}

// make rpm builds the dom0 package: its files with their modes, owners and flags (the
// chain directories and the autostart entry %config(noreplace), the chain files not in
// it), its dependencies and its scriptlets (preset, stop on erase, restart on upgrade,
// bus policy reloaded) are the golden ones; the binaries inside are static and print
// this tree's version.
func TestRPM(t *testing.T) {
	for _, tool := range []string{"make", "git", "rpmbuild", "rpm2cpio", "cpio"} {
		need(t, tool)
	}
	if err := exec.Command("git", "rev-parse", "--git-dir").Run(); err != nil {
		t.Skip("not in a git tree")
	}
	dir := t.TempDir()
	cmd := exec.Command("make", "-C", "..", "rpm", "RPMDIR="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make rpm: %v\n%s", err, out)
	}
	pkgs, _ := filepath.Glob(filepath.Join(dir, "RPMS", "*", "qcrypt-*.rpm"))
	if len(pkgs) != 1 {
		t.Fatalf("packages built: %v", pkgs)
	}
	pkg := pkgs[0]
	query := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("rpm", append([]string{"-qp"}, append(args, pkg)...)...).Output()
		if err != nil {
			t.Fatalf("rpm -qp %v: %v", args, err)
		}
		return string(out)
	}
	// The release names the commit: the same golden file for every commit.
	release := strings.TrimSpace(query("--qf", "%{RELEASE}"))
	report := "# rpm -qp --qf '%{NAME} %{VERSION} %{ARCH}'\n" + query("--qf", "%{NAME} %{VERSION} %{ARCH}\n") +
		"\n# rpm -qlp, with modes, owners and flags\n" +
		query("--qf", "[%{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME} %-3{FILEFLAGS:fflags} %{FILENAMES}\n]") +
		"\n# rpm -qp --requires --recommends\n" + query("--requires") + query("--recommends") +
		"\n# rpm -qp --scripts\n" + query("--scripts")
	report = strings.ReplaceAll(report, release, "RELEASE")
	testkit.Golden(t, "testdata/rpm.golden", report)

	// The scriptlets run: each is valid shell, and install and erase reload the bus
	// policy (busctl, faked here, records its arguments).
	fake := t.TempDir()
	calls := filepath.Join(fake, "calls")
	for _, tool := range []string{"busctl", "systemctl"} {
		script := "#!/bin/sh\necho " + tool + " \"$@\" >> " + calls + "\n"
		if err := os.WriteFile(filepath.Join(fake, tool), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range []struct{ tag, arg string }{{"POSTIN", "1"}, {"PREUN", "0"}, {"POSTUN", "0"}} {
		script := query("--qf", "%{"+s.tag+"}")
		run := exec.Command("sh", "-ec", script, "sh", s.arg)
		run.Env = append(os.Environ(), "PATH="+fake+":"+os.Getenv("PATH"))
		if out, err := run.CombinedOutput(); err != nil {
			t.Errorf("%s scriptlet: %v\n%s", s.tag, err, out)
		}
	}
	reloads, _ := os.ReadFile(calls)
	if got := strings.Count(string(reloads), "busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig\n"); got != 2 {
		t.Errorf("bus policy reloads by install and erase: %d, want 2:\n%s", got, reloads)
	}

	root := t.TempDir()
	extract := exec.Command("sh", "-c", `rpm2cpio "$1" | cpio -idm --quiet`, "sh", pkg)
	extract.Dir = root
	if out, err := extract.CombinedOutput(); err != nil {
		t.Fatalf("rpm2cpio: %v\n%s", err, out)
	}
	version, err := exec.Command("git", "describe", "--tags", "--always", "--dirty").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, bin := range []string{"qcryptd", "qcryptctl"} {
		path := filepath.Join(root, "usr/bin", bin)
		f, err := elf.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range f.Progs {
			if p.Type == elf.PT_INTERP {
				t.Errorf("%s is not static: it has an interpreter", bin)
			}
		}
		_ = f.Close()
		out, err := exec.Command(path, "--version").Output()
		if got, want := string(out), bin+" "+string(version); err != nil || got != want {
			t.Errorf("%s --version: %q %v, want %q", bin, got, err, want)
		}
	}
	// The unit and the autostart entry run the packaged binaries.
	for file, line := range map[string]*regexp.Regexp{
		"usr/lib/systemd/system/qcryptd.service":           regexp.MustCompile(`(?m)^ExecStart=/usr/bin/qcryptd$`),
		"etc/xdg/autostart/qcryptctl-notify-agent.desktop": regexp.MustCompile(`(?m)^Exec=/usr/bin/qcryptctl notify-agent$`),
	} {
		data, err := os.ReadFile(filepath.Join(root, file))
		if err != nil || !line.Match(data) {
			t.Errorf("%s: no line %s (%v)", file, line, err)
		}
	}
	// The man pages are the generated ones of this tree (rpm may compress them).
	for _, page := range []string{"man1/qcryptctl.1", "man5/qcrypt.ini.5", "man8/qcryptd.8"} {
		want, err := os.ReadFile(filepath.Join("../docs/man", filepath.Base(page)))
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Join(root, "usr/share/man", page))
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("%s: not the one in docs/man (%v)", page, err)
		}
	}
}
