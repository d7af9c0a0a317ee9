package chains

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

const base = "source vm=sys-usb\nsource file=/c.luks\nkey=k\ndestination vm 1=mediator\ndestination vm 2=work\n"

// hops is base with n destinations.
func hops(n int) string {
	s := "source vm=sys-usb\nsource file=/c.luks\nkey=k\n"
	for i := 1; i <= n; i++ {
		s += fmt.Sprintf("destination vm %d=q%d\n", i, i)
	}
	return s
}

// replace swaps one key=value line of base (or appends when old is "").
func conf(old, repl string) string {
	if old == "" {
		return base + repl + "\n"
	}
	return strings.Replace(base, old+"\n", repl+"\n", 1)
}

func loadOne(t *testing.T, content string, mode os.FileMode, asRoot bool) (*Chain, ConfigErrors) {
	t.Helper()
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "c.ini")
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	return LoadFile(p, asRoot)
}

func TestConfigRules(t *testing.T) {
	t.Parallel()
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
		"at most 32 layers":           {hops(33), hops(32), "destination vm 33", "at most 32 layers, this one has 33"},
		"ciphers that encrypt":        {conf("", "destination ciphers 1=aes-xts-plain64 cipher_null-ecb"), conf("", "destination ciphers 1=aes-xts-plain64 aes-cbc-essiv:sha256"), "destination ciphers 1", "does not encrypt"},
		"ciphers of a destination":    {conf("", "destination ciphers 3=aes-xts-plain64"), conf("", "destination ciphers 2=aes-xts-plain64"), "destination ciphers 3", "there is no"},
		"safe mount options":          {conf("", "destination mount point=/m\ndestination mount options=nosuid,$(reboot)"), conf("", "destination mount point=/m\ndestination mount options=nosuid,nodev,noexec"), "destination mount options", "not a list of mount options"},
		"mount options need a mount":  {conf("", "destination mount options=nosuid"), conf("", "destination mount point=/m\ndestination mount options=nosuid"), "destination mount options", "needs a"},
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

// TestConfigOwnership: as root, every file and directory of a target must be root's
// alone, with or without hooks (a chain file also chooses dom0 files and autostart).
func TestConfigOwnership(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("ownership rules need root to set up")
	}
	hook := conf("", "pre open command=logger x")
	tests := map[string]struct {
		content string
		change  func(root, target, file string) error
		want    string // "" = accepted
	}{
		"root 0644 with hooks":      {hook, func(r, d, f string) error { return nil }, ""},
		"root 0600 without hooks":   {base, func(r, d, f string) error { return os.Chmod(f, 0o600) }, ""},
		"world-writable, no hooks":  {base, func(r, d, f string) error { return os.Chmod(f, 0o666) }, "group or world writable (mode 0666)"},
		"group-writable with hooks": {hook, func(r, d, f string) error { return os.Chmod(f, 0o664) }, "group or world writable"},
		"file owned by nobody":      {base, func(r, d, f string) error { return os.Chown(f, 65534, 65534) }, "owned by uid 65534"},
		"file is a link to root's":  {base, func(r, d, f string) error { return errors.Join(os.Rename(f, f+".real"), os.Symlink(f+".real", f)) }, ""},
		"target dir group-writable": {base, func(r, d, f string) error { return os.Chmod(d, 0o775) }, "cannot trust configuration directory"},
		"target dir sticky 1777":    {base, func(r, d, f string) error { return os.Chmod(d, os.ModeSticky|0o777) }, "group or world writable"},
		"target dir owned by other": {base, func(r, d, f string) error { return os.Chown(d, 65534, 65534) }, "owned by uid 65534"},
		"config root writable":      {base, func(r, d, f string) error { return os.Chmod(r, 0o777) }, "cannot trust configuration directory"},
		"config root sticky 1777":   {base, func(r, d, f string) error { return os.Chmod(r, os.ModeSticky|0o777) }, ""},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			root, target := configRoot(t)
			file := filepath.Join(target, "c.ini")
			if err := os.WriteFile(file, []byte(tc.content), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(file, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := tc.change(root, target, file); err != nil {
				t.Fatal(err)
			}
			got, err := LoadTarget(target, true)
			if tc.want == "" {
				if err != nil || len(got) != 1 {
					t.Errorf("refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want %q", err, tc.want)
			}
			if _, err := LoadTarget(target, false); err != nil {
				t.Errorf("without root's checks: %v", err)
			}
		})
	}
}

// A chain file may be a link (the original's folders share a chain between targets so),
// followed as OpenSSH's StrictModes and sudo do: the file it leads to and every
// directory on both ways must be root's and not group or world writable; the error
// names the link and what is wrong on its way.
func TestChainFileLinks(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("ownership rules need root to set up")
	}
	// A name for a file right in /tmp (sticky, world writable).
	tmp := filepath.Join("/tmp", fmt.Sprintf("qcrypt-link-%d", os.Getpid()))
	tests := map[string]struct {
		link func(t *testing.T, root, target string) string // makes the link's target; returns it
		want string                                         // "" = accepted
	}{
		"to root's file elsewhere in the tree": {func(t *testing.T, root, target string) string {
			return writeChainFile(t, filepath.Join(root, "examples"), 0o755)
		}, ""},
		"to a file in a group-writable directory": {func(t *testing.T, root, target string) string {
			return writeChainFile(t, filepath.Join(root, "shared"), 0o775)
		}, "it links to ROOT/shared/ex01.ini, and ROOT/shared is group or world writable (mode 0775)"},
		"to a file above a directory of another user": {func(t *testing.T, root, target string) string {
			p := writeChainFile(t, filepath.Join(root, "theirs", "sub"), 0o755)
			if err := os.Chown(filepath.Join(root, "theirs"), 65534, 65534); err != nil {
				t.Fatal(err)
			}
			return p
		}, "it links to ROOT/theirs/sub/ex01.ini, and ROOT/theirs is owned by uid 65534, not root"},
		"to another user's file": {func(t *testing.T, root, target string) string {
			p := writeChainFile(t, filepath.Join(root, "examples"), 0o755)
			if err := os.Chown(p, 65534, 65534); err != nil {
				t.Fatal(err)
			}
			return p
		}, "it links to ROOT/examples/ex01.ini, which is owned by uid 65534, not root"},
		"dangling": {func(t *testing.T, root, target string) string {
			return filepath.Join(root, "nowhere.ini")
		}, "it is a symbolic link to ROOT/nowhere.ini, which does not exist"},
		"in a loop": {func(t *testing.T, root, target string) string {
			loop := filepath.Join(root, "loop.ini")
			if err := os.Symlink(filepath.Join(target, "ex01.ini"), loop); err != nil {
				t.Fatal(err)
			}
			return loop
		}, "it is a symbolic link in a loop of links"},
		"out of the tree into /tmp": {func(t *testing.T, root, target string) string {
			p := tmp + ".ini"
			if err := os.WriteFile(p, []byte(base), 0o644); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.Remove(p) })
			return p
		}, "it links to " + tmp + ".ini, and /tmp is group or world writable (mode 1777)"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			root, target := configRoot(t)
			link := filepath.Join(target, "ex01.ini")
			if err := os.Symlink(tc.link(t, root, target), link); err != nil {
				t.Fatal(err)
			}
			got, err := LoadTarget(target, true)
			want := strings.ReplaceAll(tc.want, "ROOT", root)
			if want == "" {
				if err != nil || len(got) != 1 || got[0].Name != "ex01" {
					t.Errorf("refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), link+": cannot be trusted: "+want) {
				t.Errorf("got %v\nwant %q", err, link+": cannot be trusted: "+want)
			}
		})
	}
}

// configRoot makes a configuration root as installed (mode 0755) with its target
// directory "default".
func configRoot(t *testing.T) (root, target string) {
	t.Helper()
	root = t.TempDir()
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	target = filepath.Join(root, "default")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	return root, target
}

// writeChainFile writes root's chain file ex01.ini into dir (made with mode).
func writeChainFile(t *testing.T, dir string, mode os.FileMode) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, mode); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "ex01.ini")
	if err := os.WriteFile(p, []byte(base), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigValues(t *testing.T) {
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
	for _, target := range []string{"valid", "invalid", "shared-mapper", "missing-dir"} {
		t.Run(target, func(t *testing.T) {
			var out bytes.Buffer
			code := Check(&out, "testdata/check/"+target, "/nonexistent")
			got := out.String() + "exit " + string(rune('0'+code)) + "\n"
			testkit.Golden(t, filepath.Join("testdata/golden", "check-"+target+".txt"), got)
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
	t.Parallel()
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
	t.Parallel()
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

// A chain from a file and one from a caller (ad-hoc, luks-init) are held to the same
// rules, by one validator; only the file's relative source path is the config's own.
func TestOneValidator(t *testing.T) {
	t.Parallel()
	good := func() *Chain {
		return &Chain{SourceVM: "sys-usb", SourceFile: "/c.luks", Key: "k", Hops: []Hop{{VM: "mediator"}, {VM: "work"}}}
	}
	tests := map[string]struct {
		old, repl string       // the config's change
		change    func(*Chain) // the same change to a chain from a caller
		want      string
	}{
		"device outside /dev": {"", "source device=/tmp/sda1\nsource mount point=/mnt/usb",
			func(c *Chain) { c.SourceDevice, c.SourceMountPoint = "/tmp/sda1", "/mnt/usb" }, "must be a device path under /dev/"},
		"device without mount point": {"", "source device=/dev/sda1",
			func(c *Chain) { c.SourceDevice = "/dev/sda1" }, `needs a "source mount point"`},
		"source decrypts": {"destination vm 2=work", "destination vm 2=sys-usb",
			func(c *Chain) { c.Hops[1].VM = "sys-usb" }, "the source qube must not decrypt"},
		"qube twice": {"destination vm 2=work", "destination vm 2=mediator",
			func(c *Chain) { c.Hops[1].VM = "mediator" }, "decrypts more than one layer"},
		"dom0": {"destination vm 2=work", "destination vm 2=dom0",
			func(c *Chain) { c.Hops[1].VM = "dom0" }, "dom0 is never part of a chain"},
		"mount point /": {"", "destination mount point=/",
			func(c *Chain) { c.MountPoint = "/" }, "must not be /"},
		"file up and out": {"source file=/c.luks", "source file=/a/../../etc/shadow",
			func(c *Chain) { c.SourceFile = "/a/../../etc/shadow" }, "must not contain a .. component"},
		"relative inject": {"", "destination inj 1=k.key",
			func(c *Chain) { c.Hops[0].Inject = "k.key" }, "must be absolute"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, errs := loadOne(t, conf(tc.old, tc.repl), 0o644, false)
			if len(errs) != 1 || !strings.Contains(errs[0].Msg, tc.want) {
				t.Errorf("config: %v, want one error with %q", errs, tc.want)
			}
			c := good()
			tc.change(c)
			if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("caller's chain: %v, want %q", err, tc.want)
			}
		})
	}
	// The config's source file is relative to the source mount point ("/" without one);
	// a caller gives a full path.
	if _, errs := loadOne(t, conf("source file=/c.luks", "source file=c.luks"), 0o644, false); len(errs) != 0 {
		t.Errorf("relative source file in a config: %v", errs)
	}
	c := good()
	c.SourceFile = "c.luks"
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "must be absolute") {
		t.Errorf("relative file from a caller: %v", err)
	}
}

// docs/qcrypt.ini.md is the reference the loader's key list comes from; its example is
// a valid chain file.
func TestReferenceDoc(t *testing.T) {
	t.Parallel()
	testkit.Golden(t, "../docs/qcrypt.ini.md", ReferenceMarkdown())
	if _, errs := loadOne(t, exampleChain, 0o644, false); len(errs) != 0 {
		t.Errorf("the example: %v", errs)
	}
	if len(plainKeys) != 15 {
		t.Errorf("%d plain keys: %v", len(plainKeys), plainKeys)
	}
}

// The original's configuration folders, in their layout (fresh content): a chain shared
// between targets by a link to ../examples/ex01.ini, one invalid file per test-invalid
// folder. Each folder checks as the original's own tests expect: the invalid ones report
// their file's defect and nothing of the linked chain, the valid ones report nothing.
func TestOriginalConfFolders(t *testing.T) {
	t.Parallel()
	if os.Geteuid() != 0 {
		t.Skip("root's ownership rules need root")
	}
	root := t.TempDir()
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	// cp -a keeps the links; the copy is root's, as an installed folder is.
	if out, err := exec.Command("cp", "-a", "testdata/original-conf/.", root).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	if out, err := exec.Command("chmod", "-R", "go-w", root).CombinedOutput(); err != nil {
		t.Fatalf("chmod: %v %s", err, out)
	}
	for folder, want := range map[string]string{
		"examples":        "",
		"test-valid-01":   "",
		"test-valid-02":   "",
		"test-valid-03":   "",
		"test-invalid-01": "invalid01.ini: source vm: missing (required)",
		"test-invalid-02": "invalid02.ini:3: source file: empty (required)\n" + root + "/test-invalid-02/invalid02.ini:4: key: empty (required)",
		"test-invalid-03": "invalid03.ini: destination vm 1: missing (at least one destination is required)",
		"test-invalid-04": "invalid04.ini:6: read-only: \"nope\" is not a boolean",
		"test-invalid-05": "invalid05.ini:6: readonly: unknown key (did you mean \"read-only\"?)",
		"test-invalid-06": "invalid06.ini:15: pre close comand: unknown key (did you mean \"pre close command\"?)",
	} {
		t.Run(folder, func(t *testing.T) {
			got := strings.Join(CheckTarget(folder, root, true), "\n")
			if want == "" && got != "" {
				t.Errorf("a valid folder: %s", got)
			}
			if want != "" && (!strings.Contains(got, root+"/"+folder+"/"+want) || strings.Contains(got, "ex01")) {
				t.Errorf("got:\n%s\nwant:\n%s", got, root+"/"+folder+"/"+want)
			}
		})
	}
}
