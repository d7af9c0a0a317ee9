package systemd

import (
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// make install PREFIX=/usr/local puts everything where its reader looks, makes every
// installed file that names a binary name the installed one, and builds the binaries
// with the tree's version; make uninstall takes it all away again.
func TestInstallUnderAPrefix(t *testing.T) {
	if _, err := exec.LookPath("make"); err != nil {
		t.Skip("no make")
	}
	dest := t.TempDir()
	runMake := func(target string) {
		t.Helper()
		cmd := exec.Command("make", "-C", "..", target, "DESTDIR="+dest, "PREFIX=/usr/local", "BIN="+t.TempDir())
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("make %s: %v\n%s", target, err, out)
		}
	}
	files := func() []string {
		var out []string
		_ = filepath.Walk(dest, func(p string, info os.FileInfo, err error) error {
			if err == nil && !info.IsDir() {
				out = append(out, strings.TrimPrefix(p, dest))
			}
			return nil
		})
		sort.Strings(out)
		return out
	}
	runMake("install")
	want := []string{
		"/etc/xdg/autostart/qcryptctl-notify-agent.desktop",
		"/usr/local/bin/qcryptctl",
		"/usr/local/bin/qcryptd",
		"/usr/local/lib/systemd/system/qcryptd.service",
		"/usr/local/share/bash-completion/completions/qcryptctl",
		"/usr/local/share/dbus-1/system-services/org.qcrypt.Qcryptd1.service",
		"/usr/local/share/man/man1/qcryptctl.1",
		"/usr/local/share/man/man5/qcrypt.ini.5",
		"/usr/local/share/man/man8/qcryptd.8",
		"/usr/local/share/zsh/site-functions/_qcryptctl",
		"/usr/share/dbus-1/system.d/org.qcrypt.Qcryptd1.conf", // the bus reads no other prefix
	}
	if got := files(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("installed:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	for file, line := range map[string]string{
		"/usr/local/lib/systemd/system/qcryptd.service":     "ExecStart=/usr/local/bin/qcryptd",
		"/etc/xdg/autostart/qcryptctl-notify-agent.desktop": "Exec=/usr/local/bin/qcryptctl notify-agent",
	} {
		data, err := os.ReadFile(filepath.Join(dest, file))
		if err != nil || !strings.Contains(string(data), line+"\n") || strings.Contains(string(data), "/usr/bin/") {
			t.Errorf("%s: want %q and no /usr/bin/ (%v):\n%s", file, line, err, data)
		}
	}
	// Both binaries print the version make gave them: git describe of this tree.
	if want, err := exec.Command("git", "describe", "--tags", "--always", "--dirty").Output(); err == nil {
		for _, bin := range []string{"qcryptd", "qcryptctl"} {
			out, err := exec.Command(filepath.Join(dest, "usr/local/bin", bin), "--version").Output()
			if got := string(out); err != nil || got != bin+" "+string(want) {
				t.Errorf("%s --version: %q %v, want %q", bin, got, err, bin+" "+string(want))
			}
		}
	}
	runMake("uninstall")
	if left := files(); len(left) != 0 {
		t.Errorf("left after uninstall: %v", left)
	}
}
