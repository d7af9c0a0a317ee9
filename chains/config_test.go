package chains

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/chains/golden"
)

const base = "source vm=sys-usb\nsource file=/c.luks\nkey=k\ndestination vm 1=mediator\ndestination vm 2=work\n"

// replace swaps one key=value line of base (or appends when old is "").
func conf(old, new string) string {
	if old == "" {
		return base + new + "\n"
	}
	return strings.Replace(base, old+"\n", new+"\n", 1)
}

func loadOne(t *testing.T, content string, mode os.FileMode, asRoot bool) (*Chain, ConfigErrors) {
	t.Helper()
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	p := filepath.Join(dir, "c.ini")
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	os.Chmod(p, mode)
	return LoadFile(p, asRoot)
}

func TestConfigRules(t *testing.T) {
	tests := map[string]struct {
		bad, good string // whole file contents
		wantKey   string // key named in the error
		wantMsg   string
	}{
		"source vm required":          {conf("source vm=sys-usb", ""), base, "source vm", "missing"},
		"source file not empty":       {conf("source file=/c.luks", "source file="), base, "source file", "empty"},
		"key not empty":               {conf("key=k", "key="), base, "key", "empty"},
		"destination vm 1 required":   {"source vm=a\nsource file=/c\nkey=k\n", base, "destination vm 1", "missing"},
		"booleans":                    {conf("", "read-only=false!"), conf("", "read-only=no"), "read-only", "not a boolean"},
		"autostart boolean":           {conf("", "autostart=maybe"), conf("", "autostart=TRUE"), "autostart", "not a boolean"},
		"unknown key":                 {conf("", "readonly=false"), conf("", "read-only=false"), "readonly", `unknown key (did you mean "read-only"?)`},
		"misspelt key":                {conf("", "pre close clommand=x"), conf("", "pre close command=x"), "pre close clommand", `did you mean "pre close command"`},
		"integer interval":            {conf("", "startup interval=5m"), conf("", "startup interval=5"), "startup interval", "not a non-negative number"},
		"no gap in destinations":      {conf("destination vm 2=work", "destination vm 3=work"), base, "destination vm 3", "without gaps"},
		"key id pattern":              {conf("key=k", "key=a/b"), conf("key=k", "key=a_B+1.-x"), "key", "must match"},
		"qube names":                  {conf("destination vm 2=work", "destination vm 2=work.x"), conf("destination vm 2=work", "destination vm 2=work_x-2"), "destination vm 2", "invalid qube name"},
		"source qube name":            {conf("source vm=sys-usb", "source vm=default"), base, "source vm", "reserved"},
		"absolute mount point":        {conf("", "destination mount point=mnt/x"), conf("", "destination mount point=/mnt/x"), "destination mount point", "must be absolute"},
		"absolute source mount point": {conf("", "source mount point=usb"), conf("", "source mount point=/usb"), "source mount point", "must be absolute"},
		"absolute injected key":       {conf("", "destination inj 1=keys/k"), conf("", "destination inj 1=/root/keys/k"), "destination inj 1", "must be absolute"},
		"keystore injection":          {conf("", "destination inj 1=keystore:x"), conf("", "destination inj 1=keystore://"), "destination inj 1", "must be absolute"},
		"no .. in source file":        {conf("source file=/c.luks", "source file=/a/../../etc/shadow"), conf("source file=/c.luks", "source file=a/c.luks"), "source file", "must not contain a .. component"},
		"source device under /dev":    {conf("", "source device=/tmp/x\nsource mount point=/m"), conf("", "source device=/dev/disk/by-label/X\nsource mount point=/m"), "source device", "under /dev/"},
		"source device needs a mp":    {conf("", "source device=/dev/sda1"), conf("", "source device=/dev/sda1\nsource mount point=/m"), "source device", "needs a"},
		"injection needs its qube":    {conf("", "destination inj 3=/k"), conf("", "destination inj 2=/k"), "destination inj 3", "there is no"},
		"allow-listed options":        {conf("", "destination opt 1=--header /tmp/h"), conf("", "destination opt 1=--type plain --cipher aes-cbc-essiv:sha256 -s 256"), "destination opt 1", "not allowed"},
		"no shell in options":         {conf("", "destination opt 1=--cipher $(reboot)"), conf("", "destination opt 1=--cipher=aes-xts-plain64"), "destination opt 1", "shell syntax"},
		"one layer per qube":          {conf("destination vm 2=work", "destination vm 2=mediator"), base, "destination vm 2", "more than one layer"},
		"source does not decrypt":     {conf("destination vm 2=work", "destination vm 2=sys-usb"), base, "destination vm 2", "must not decrypt"},
		"set twice":                   {conf("", "key=other"), base, "key", "set twice (first on line 3)"},
		"no sections":                 {"[s]\n" + base, base, "", "sections are not used"},
		"key=value lines only":        {conf("", "just words"), conf("", "# just words"), "", "not a key=value line"},
		"type":                        {conf("", "type=zfs"), conf("", "type=plain"), "type", "not one of"},
		"dom0 never decrypts":         {conf("destination vm 2=work", "destination vm 2=dom0"), base, "destination vm 2", "dom0 is never part of a chain"},
		"dom0 never serves":           {conf("source vm=sys-usb", "source vm=dom0"), base, "source vm", "dom0 is never part of a chain"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if c, errs := loadOne(t, tc.good, 0o644, false); c == nil {
				t.Fatalf("good config refused: %v", errs)
			}
			_, errs := loadOne(t, tc.bad, 0o644, false)
			found := false
			for _, e := range errs {
				found = found || e.Key == tc.wantKey && strings.Contains(e.Msg, tc.wantMsg)
			}
			if !found {
				t.Errorf("want error on %q containing %q; got %v", tc.wantKey, tc.wantMsg, errs)
			}
		})
	}
}

func TestConfigRootRunCommands(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("ownership rules need root to set up")
	}
	hook := conf("", "pre open command=logger x")
	if _, errs := loadOne(t, hook, 0o666, true); len(errs) == 0 || !strings.Contains(errs[0].Msg, "world writable") {
		t.Errorf("world-writable hook file accepted: %v", errs)
	}
	if c, errs := loadOne(t, hook, 0o644, true); c == nil {
		t.Errorf("root-owned 0644 refused: %v", errs)
	}
	if c, errs := loadOne(t, base, 0o666, true); c == nil {
		t.Errorf("a file without commands needs no ownership check: %v", errs)
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "c.ini")
	os.WriteFile(p, []byte(hook), 0o644)
	os.Chown(p, 65534, 65534)
	if _, errs := LoadFile(p, true); len(errs) == 0 || !strings.Contains(errs[0].Msg, "not root") {
		t.Errorf("file owned by nobody accepted: %v", errs)
	}
}

func TestConfigValues(t *testing.T) {
	chains, err := LoadTarget("testdata/check/valid", false)
	if err != nil {
		t.Fatal(err)
	}
	c := chains[0]
	if c.Name != "ex03" || c.SourceVM != "another-usb" || c.Container() != "/mnt-ex03/containers/ex03-container.luks" ||
		c.Key != "ex03-key" || len(c.Hops) != 3 || c.Target() != "work2" || c.Hops[1].Inject != "/another/path.key" ||
		!c.Autostart || !c.ReadOnly || c.StartupInterval != 5*time.Second || c.MountPoint != "/qcrypt-ex03" {
		t.Errorf("ex03 parsed as %+v", c)
	}
	m := chains[1]
	if m.ReadOnly != true || m.Autostart || m.StartupInterval != DefaultStartupInterval || strings.Join(m.Hops[0].Options, " ") != "--type luks2 --allow-discards" || m.MountPoint != "" {
		t.Errorf("defaults: %+v", m)
	}
}

func TestLoadTargetReportsAllFiles(t *testing.T) {
	_, err := LoadTarget("testdata/check/invalid", false)
	var errs ConfigErrors
	if !errors.As(err, &errs) {
		t.Fatalf("got %v", err)
	}
	files := map[string]bool{}
	for _, e := range errs {
		files[filepath.Base(e.File)] = true
	}
	if !files["a-everything-wrong.ini"] || !files["b-missing.ini"] {
		t.Errorf("errors of only %v", files)
	}
}

func TestCheckGolden(t *testing.T) {
	for _, target := range []string{"valid", "invalid", "clash", "missing-dir"} {
		t.Run(target, func(t *testing.T) {
			var out bytes.Buffer
			code := Check(&out, "testdata/check/"+target, "/nonexistent")
			got := out.String() + "exit " + string(rune('0'+code)) + "\n"
			golden.Check(t, filepath.Join("testdata/golden", "check-"+target+".txt"), got)
		})
	}
	t.Run("target name under root", func(t *testing.T) {
		var out bytes.Buffer
		if code := Check(&out, "valid", "testdata/check"); code != 0 || out.String() != "All good.\n" {
			t.Errorf("got %d %q", code, out.String())
		}
	})
}

func TestParseCryptOptions(t *testing.T) {
	got, err := ParseCryptOptions("-c aes-xts-plain64 --key-size=512 -M plain --allow-discards")
	if err != nil || strings.Join(got, " ") != "--cipher aes-xts-plain64 --key-size 512 --type plain --allow-discards" {
		t.Errorf("got %v %v", got, err)
	}
	for _, bad := range []string{"--key-file /x", "--type", "--key-size big", "--allow-discards=1", "-c 'x'", "--cipher a;b"} {
		if _, err := ParseCryptOptions(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestCryptArgsPerAction(t *testing.T) {
	opts, err := ParseCryptOptions("--pbkdf pbkdf2 --pbkdf-force-iterations 1000 --allow-discards -c aes-xts-plain64 --use-urandom")
	if err != nil {
		t.Fatal(err)
	}
	c := &Chain{Type: "luks2", Hops: []Hop{{VM: "a", Options: opts}}}
	for _, tc := range []struct{ action, want string }{
		{"open", "--type luks2 --allow-discards --cipher aes-xts-plain64"},
		{"luksFormat", "--type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --cipher aes-xts-plain64 --use-urandom"},
	} {
		if got := strings.Join(c.CryptArgs(0, tc.action), " "); got != tc.want {
			t.Errorf("%s: got %q, want %q", tc.action, got, tc.want)
		}
	}
}
