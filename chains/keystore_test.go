package chains

import (
	"os/exec"
	"strings"
	"testing"
)

func TestParseKeystoreRef(t *testing.T) {
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

func TestKeystoreKeyNamesAreChecked(t *testing.T) {
	e := &Engine{}
	for _, n := range [][2]string{{"../x", "k"}, {"work", "a/b"}, {"work", ""}, {"", "k"}} {
		if _, err := e.KeystoreKey(bg, Keystore{Dir: "/s"}, n[0], n[1]); err == nil {
			t.Errorf("%q accepted", n)
		}
	}
}
