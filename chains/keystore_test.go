package chains

import (
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcrypt/qcrypt/qubes"
)

func TestParseKeystoreRef(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in, dir string
		ok      bool
		bad     bool
	}{
		{in: "keystore://", dir: DefaultKeystoreDir, ok: true},
		{in: "keystore:///", dir: DefaultKeystoreDir, ok: true},
		{in: "keystore:///etc/blib/keys", dir: "/etc/blib/keys", ok: true},
		{in: "keystore:///srv/my.keys/", dir: "/srv/my.keys", ok: true},
		{in: "keystore://relative", ok: true, bad: true},
		{in: "keystore:///a/../etc", ok: true, bad: true},
		{in: "keystore:///a b", ok: true, bad: true},
		{in: "keystore:///a;rm", ok: true, bad: true},
		{in: "/home/user/key", ok: false},
	}
	for _, tc := range tests {
		dir, ok, err := ParseKeystoreRef(tc.in)
		if ok != tc.ok || (err != nil) != tc.bad || !tc.bad && dir != tc.dir {
			t.Errorf("%q: %q %v %v, want %q %v bad=%v", tc.in, dir, ok, err, tc.dir, tc.ok, tc.bad)
		}
	}
}

// blib names the store's mapper "blib-dmcrypt-" + md5sum of the canonical container
// path fed by a here-string (with its newline): the same name, so a store the original
// opened is recognised. Held against md5sum itself.
func TestKeystoreMapperNameIsBlibs(t *testing.T) {
	t.Parallel()
	for _, dir := range []string{"/etc/blib/keys", "/root/store"} {
		k := Keystore{Dir: dir}
		out, err := exec.Command("bash", "-c", `md5sum <<< "$1"`, "bash", k.Container()).Output()
		if err != nil {
			t.Skip("no bash or md5sum")
		}
		want := "blib-dmcrypt-" + strings.Fields(string(out))[0]
		if got := k.MapperName(); got != want {
			t.Errorf("%s: %s, want %s", dir, got, want)
		}
	}
	if got := KeyFile("work", "vault"); got != "qcrypt/work_vault.key" {
		t.Errorf("key file %s", got)
	}
}

// noDom0 fails the test if a script reaches dom0.
type noDom0 struct{ t *testing.T }

func (d noDom0) Run(context.Context, string, io.Reader, ...*os.File) (qubes.Result, error) {
	d.t.Error("a script ran in dom0")
	return qubes.Result{ExitCode: 1}, nil
}
func (d noDom0) Open(string) (io.ReadCloser, error) {
	d.t.Error("a dom0 file was opened")
	return nil, os.ErrNotExist
}

// Qube and key names are checked before a key file path is made of them: nothing runs.
func TestKeystoreKeyNamesAreChecked(t *testing.T) {
	t.Parallel()
	e := &Engine{Dom0: noDom0{t}}
	for _, n := range [][2]string{{"../x", "k"}, {"work", "a/b"}, {"work", ""}, {"", "k"}, {"work", "../../etc/shadow"}} {
		if _, err := e.KeystoreKey(bg, Keystore{Dir: "/s"}, n[0], n[1]); err == nil || !strings.Contains(err.Error(), "invalid") {
			t.Errorf("%q: %v, want it refused as invalid", n, err)
		}
		if err := e.KeystoreAdd(bg, Keystore{Dir: "/s"}, n[1], map[string][]byte{n[0]: []byte("k")}); err == nil || !strings.Contains(err.Error(), "invalid") {
			t.Errorf("add %q: %v, want it refused as invalid", n, err)
		}
	}
}

// The check holds key store references to a store that is there, and, for root, root's
// alone; a reference that is not a path is a config error of its line.
func TestCheckKeystores(t *testing.T) {
	t.Parallel()
	stores := t.TempDir()
	present := filepath.Join(stores, "present")
	if err := os.MkdirAll(present, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(present, "keys.lks"), []byte("luks"), 0o600); err != nil {
		t.Fatal(err)
	}
	chain := func(inj1, inj2 string) string {
		s := "source vm=sys-usb\nsource file=/c.luks\nkey=k\ndestination vm 1=mediator\ndestination inj 1=" + inj1 +
			"\ndestination vm 2=work\n"
		if inj2 != "" {
			s += "destination inj 2=" + inj2 + "\n"
		}
		return s
	}
	tests := map[string]struct {
		chain, want string
		root        bool
	}{
		"present and missing": {chain: chain("keystore://"+present, "keystore://"+stores+"/missing"),
			want: "c.ini: destination inj 2: no key store in " + stores + "/missing (keys.lks is missing)"},
		"not a path": {chain: chain("keystore://relative/x", "keystore://"+present),
			want: "c.ini:5: destination inj 1: key store directory \"relative/x\""},
		"writable by others": {root: true, chain: chain("keystore://"+present, ""),
			want: "destination inj 1: cannot trust key store " + present + "/keys.lks: group or world writable (mode 0666)"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if tc.root {
				if os.Geteuid() != 0 {
					t.Skip("needs root: the ownership rules are root's")
				}
				if err := os.Chmod(filepath.Join(present, "keys.lks"), 0o666); err != nil {
					t.Fatal(err)
				}
				defer func() { _ = os.Chmod(filepath.Join(present, "keys.lks"), 0o600) }() // for the next case
			}
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "c.ini"), []byte(tc.chain), 0o644); err != nil {
				t.Fatal(err)
			}
			got := CheckTarget(dir, "/", tc.root)
			if len(got) != 1 || !strings.Contains(got[0], tc.want) {
				t.Errorf("got %q, want one problem with %q", got, tc.want)
			}
		})
	}
}
