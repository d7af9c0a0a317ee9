package chains

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim"
)

func initSpec(fs string) InitSpec {
	return InitSpec{
		Chain: &Chain{Name: "new", SourceVM: "sys-usb", SourceFile: "/home/user/vault/new.luks", Key: "newkey",
			Hops:       []Hop{{VM: "mediator", Options: []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}}, {VM: "work"}},
			MountPoint: "/mnt/new"},
		Size: 34 << 20, KeySize: 64, FS: fs, Autostart: true,
	}
}

// simPrivateDir is luks-init's directory in the simulated dom0, whose /run lasts one
// command (qcryptd uses the same with --dom0-root).
const simPrivateDir = "/tmp/qcryptd-luks-init"

func luksRig(t *testing.T) *rig {
	r := newRig(t, qubessim.R42)
	r.e.Dom0 = checkedDom0{r.Dom0(r.Runner)}
	r.e.PrivateDir = simPrivateDir
	return r
}

// nothingLeft fails t if initSpec's luks-init left anything: the container (or its
// .part) in sys-usb, a key in a destination, a file in dom0's private directory.
func (r *rig) nothingLeft(t *testing.T) {
	t.Helper()
	if got := string(r.Sh(t, "sys-usb", "ls -a /home/user/vault 2>/dev/null").Stdout); strings.Contains(got, "new.luks") {
		t.Errorf("left in sys-usb: %q", got)
	}
	for _, vm := range []string{"mediator", "work"} {
		if got := string(r.Sh(t, vm, "ls -a /home/user/.qcrypt/keys").Stdout); strings.Contains(got, "newkey") {
			t.Errorf("left in %s: %q", vm, got)
		}
	}
	if left := r.privateLeft(t); len(left) != 0 {
		t.Errorf("dom0 work files left: %v", left)
	}
}

// privateLeft lists what luks-init left in its private directory.
func (r *rig) privateLeft(t *testing.T) []string {
	dom0, _ := r.VM("dom0")
	left, _ := filepath.Glob(filepath.Join(dom0.Root(), simPrivateDir, "*"))
	return left
}

func TestLuksInitThenOpen(t *testing.T) {
	t.Parallel()
	for _, fs := range []string{"btrfs", "ext4"} {
		t.Run(fs, func(t *testing.T) {
			r := luksRig(t)
			spec := initSpec(fs)
			// The caller's files: backups it created, and for ext4 its own entropy.
			backups := map[string]*bytes.Buffer{"mediator": {}, "work": {}}
			spec.Backups = map[string]io.Writer{"mediator": backups["mediator"], "work": backups["work"]}
			var keyEntropy []byte
			if fs == "ext4" {
				keyEntropy = bytes.Repeat([]byte("0123456789abcdef"), 8)
				spec.KeyEntropy = bytes.NewReader(keyEntropy)
				spec.ContainerEntropy = bytes.NewReader(bytes.Repeat([]byte{0x5a}, int(spec.Size)))
			}
			var last Progress
			var bytesSeen []int64
			err := r.e.LuksInit(bg, spec, func(p Progress) {
				if p.Total > 0 {
					bytesSeen = append(bytesSeen, p.Bytes)
				}
				last = p
			})
			if err != nil {
				t.Fatal(err)
			}
			if last.Step != last.Steps || len(bytesSeen) == 0 || bytesSeen[len(bytesSeen)-1] != spec.Size {
				t.Errorf("progress: last %+v bytes %v", last, bytesSeen)
			}
			for i := 1; i < len(bytesSeen); i++ {
				if bytesSeen[i] < bytesSeen[i-1] {
					t.Errorf("bytes went backwards: %v", bytesSeen)
				}
			}
			// Each backup holds the key its qube got; the caller's entropy made them.
			for i, vm := range []string{"mediator", "work"} {
				inQube := r.Sh(t, vm, "cat /home/user/.qcrypt/keys/newkey").Stdout
				if got := backups[vm].Bytes(); len(got) != 64 || !bytes.Equal(got, inQube) {
					t.Errorf("backup of %s: %d bytes, same as the qube's key: %v", vm, len(got), bytes.Equal(got, inQube))
				}
				if keyEntropy != nil && !bytes.Equal(inQube, keyEntropy[i*64:(i+1)*64]) {
					t.Errorf("key of %s is not from the caller's entropy", vm)
				}
			}
			if left := r.privateLeft(t); len(left) != 0 {
				t.Errorf("dom0 work files left: %v", left)
			}
			if got := string(r.Sh(t, "work", "stat -c %a /home/user/.qcrypt/keys/newkey").Stdout); got != "600\n" {
				t.Errorf("key mode %q", got)
			}
			c := spec.Chain
			if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
				t.Fatal(err)
			}
			marker := "luks-init-marker-42"
			r.Sh(t, "work", "echo "+marker+" > /mnt/new/f")
			if err := r.e.Close(bg, c, CloseOptions{}, Closing{}, nil); err != nil {
				t.Fatal(err)
			}
			usb, _ := r.VM("sys-usb")
			data, _ := os.ReadFile(filepath.Join(usb.Root(), c.Container()))
			if int64(len(data)) != spec.Size || bytes.Contains(data, []byte(marker)) {
				t.Errorf("container: %d bytes, marker inside: %v", len(data), bytes.Contains(data, []byte(marker)))
			}
			if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
				t.Fatal(err)
			}
			if got := string(r.Sh(t, "work", "cat /mnt/new/f").Stdout); got != marker+"\n" {
				t.Errorf("after reopen %q", got)
			}
			// A second luks-init must refuse: the file and the keys exist.
			r.e.Close(bg, c, CloseOptions{}, Closing{}, nil)
			if err := r.e.LuksInit(bg, initSpec(fs), nil); err == nil || !strings.Contains(err.Error(), "never overwritten") {
				t.Errorf("second luks-init: %v", err)
			}
		})
	}
}

func TestLuksInitRefusesAndLeavesNothing(t *testing.T) {
	t.Parallel()
	tests := map[string]struct {
		setup func(t *testing.T, r *rig, s *InitSpec)
		want  string
	}{
		"existing key in a destination": {func(t *testing.T, r *rig, s *InitSpec) {
			r.start(t, "work")
			r.Sh(t, "work", "echo old > /home/user/.qcrypt/keys/newkey")
		}, "a key with that id exists already"},
		"existing file in the source": {func(t *testing.T, r *rig, s *InitSpec) {
			r.Sh(t, "sys-usb", "mkdir -p /home/user/vault && echo x > /home/user/vault/new.luks")
		}, "the file exists already"},
		"halted qube without autostart": {func(t *testing.T, r *rig, s *InitSpec) { s.Autostart = false }, "qube not running"},
		"no space in the work dir": {func(t *testing.T, r *rig, s *InitSpec) {
			s.Size = 1 << 60
		}, "not enough free space"},
		"backup cannot be written": {func(t *testing.T, r *rig, s *InitSpec) {
			s.Backups = map[string]io.Writer{"work": failingWriter{}}
		}, "cannot write the key backup for work"},
		"short key entropy": {func(t *testing.T, r *rig, s *InitSpec) {
			s.KeyEntropy = bytes.NewReader(make([]byte, 100))
		}, "the entropy source gave less than 64 bytes"},
		"bad file system":                 {func(t *testing.T, r *rig, s *InitSpec) { s.FS = "zfs" }, "not btrfs or ext4"},
		"dom0 as a destination":           {func(t *testing.T, r *rig, s *InitSpec) { s.Chain.Hops[1].VM = "dom0" }, "dom0 is never part of a chain"},
		"dom0 as the source":              {func(t *testing.T, r *rig, s *InitSpec) { s.Chain.SourceVM = "dom0" }, "dom0 is never part of a chain"},
		"too small for two LUKS2 headers": {func(t *testing.T, r *rig, s *InitSpec) { s.Size = 32 << 20 }, "at least 34 MiB for 2 layers"},
		"source copy fails": {func(t *testing.T, r *rig, s *InitSpec) {
			r.start(t, "mediator", "work")
			// the container's directory is a file: copying it fails after the keys went in
			r.Sh(t, "sys-usb", "echo x > /home/user/vault")
		}, "cannot write the file"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			r := luksRig(t)
			s := initSpec("ext4")
			tc.setup(t, r, &s)
			err := r.e.LuksInit(bg, s, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
			for _, vm := range []string{"mediator", "work"} {
				if st, _ := r.Client.CurrentState(bg, vm); st != "Running" {
					continue
				}
				got := string(r.Sh(t, vm, "cat /home/user/.qcrypt/keys/newkey 2>/dev/null").Stdout)
				if got != "" && got != "old\n" {
					t.Errorf("a new key was left in %s", vm)
				}
			}
			if left := r.leftovers(t); len(left) != 0 {
				t.Errorf("left: %v", left)
			}
			if left := r.privateLeft(t); len(left) != 0 {
				t.Errorf("dom0 work files left: %v", left)
			}
		})
	}
}

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("disk full") }

// A luks-init cut short (qcryptd killed) leaves keys in the private directory: the next
// start wipes and removes them.
func TestCleanPrivateDir(t *testing.T) {
	t.Parallel()
	r := luksRig(t)
	dom0, _ := r.VM("dom0")
	left := filepath.Join(dom0.Root(), simPrivateDir, "luks-init.abcdefgh")
	if err := os.MkdirAll(left, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(left, "key0"), []byte("secret key bytes"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(left, "container"), []byte("ciphertext"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.e.CleanPrivateDir(bg); err != nil {
		t.Fatal(err)
	}
	if l := r.privateLeft(t); len(l) != 0 {
		t.Errorf("left after the clean-up: %v", l)
	}
}

// The wipe overwrites a key in place before removing it (truncating would free its
// pages unwritten); the script runs here with the host's bash and coreutils.
func TestWipeOverwritesKeysInPlace(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	key := filepath.Join(dir, "key0")
	if err := os.WriteFile(key, []byte("secret key bytes"), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(key) // still sees the inode after the removal
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if out, err := exec.Command("/bin/bash", "-c", wipeScript(dir)).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("directory still there: %v", err)
	}
	data, _ := io.ReadAll(f)
	if !bytes.Equal(data, make([]byte, len("secret key bytes"))) {
		t.Errorf("key not overwritten in place: %q", data)
	}
}

func TestParseSize(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]int64{"1G": 1 << 30, "512m": 512 << 20, "4096": 4096, "2T": 2 << 40, "10K": 10 << 10} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("%s: %d %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "1.5G", "-1", "1P", "G", "0"} {
		if _, err := ParseSize(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestMinContainerSize(t *testing.T) {
	t.Parallel()
	two := []Hop{{VM: "a"}, {VM: "b"}}
	for _, tc := range []struct {
		c    Chain
		want int64
	}{
		{Chain{Hops: two}, 34 << 20},
		{Chain{Type: "luks1", Hops: two}, 6 << 20},
		{Chain{Hops: []Hop{{VM: "a", Options: []string{"--type", "luks1"}}, {VM: "b"}}}, 20 << 20},
	} {
		if got := minContainerSize(&tc.c); got != tc.want {
			t.Errorf("%+v: %d MiB, want %d MiB", tc.c, got>>20, tc.want>>20)
		}
	}
}

// Discover links a hop to the next only when the qube says its mapper sits on the
// device the chain gave it: with a one-layer chain into mediator beside the two-layer
// demo chain through it, the one-layer chain is not taken for a part of the other.
func TestDiscoverLinksByProof(t *testing.T) {
	t.Parallel()
	r := luksRig(t)
	one := &Chain{Name: "one", SourceVM: "sys-usb", SourceFile: "/home/user/one.luks", Key: "one",
		Hops: []Hop{{VM: "mediator", Options: []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}}}, Type: "luks"}
	if err := r.e.LuksInit(bg, InitSpec{Chain: one, Size: 20 << 20, KeySize: 64, FS: "ext4", Autostart: true}, nil); err != nil {
		t.Fatal(err)
	}
	r.start(t, "work")
	if err := r.e.Open(bg, demoChain(), OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	if err := r.e.Open(bg, one, OpenOptions{}, nil); err != nil {
		t.Fatal(err)
	}
	got := r.discover(t, func(d Discovered) string {
		return fmt.Sprintf("%s key=%q managed=%v/%v", d, d.Key, d.Matches(demoChain()), d.Matches(one))
	})
	want := `sys-usb:loop0 --> mediator:dm-0 --> work:xvdi (r/w) key="demo" managed=true/false` + "\n" +
		`sys-usb:loop1 --> mediator:xvdj (r/w) key="" managed=false/true`
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}

// failingStoreDom0 is dom0 with a key store that can take the keys but fails to add
// them: luks-init's last step fails after everything was copied into the qubes.
type failingStoreDom0 struct{ Dom0 }

func (d failingStoreDom0) Run(ctx context.Context, script string, input io.Reader, files ...*os.File) (qubes.Result, error) {
	switch {
	case strings.Contains(script, "remount,bind"):
		return qubes.Result{ExitCode: 13}, nil
	case strings.Contains(script, `mountpoint -q "$mp"`):
		return qubes.Result{}, nil
	}
	return d.Dom0.Run(ctx, script, input, files...)
}

// A step failing after the copies (the key store refuses the keys) takes the keys and
// the container out of the qubes again, in reverse order.
func TestLuksInitUndoesTheCopies(t *testing.T) {
	t.Parallel()
	r := luksRig(t)
	r.e.Dom0 = failingStoreDom0{r.e.Dom0}
	s := initSpec("ext4")
	s.Keystore = &Keystore{Dir: "/etc/blib"}
	var descs []string
	err := r.e.LuksInit(bg, s, func(p Progress) {
		if p.Bytes == 0 {
			descs = append(descs, p.Desc)
		}
	})
	if err == nil || !strings.Contains(err.Error(), "key store /etc/blib") {
		t.Fatalf("got %v, want the key store's refusal", err)
	}
	if got := descs[len(descs)-1]; got != "add the keys to the key store /etc/blib" {
		t.Errorf("last step %q", got)
	}
	r.nothingLeft(t)
}

// A luks-init canceled while it copies the container (Ctrl-C of qcryptctl) leaves
// nothing in the qubes: no keys, no container, no half-written .part.
func TestLuksInitCanceledMidCopy(t *testing.T) {
	t.Parallel()
	r := luksRig(t)
	s := initSpec("ext4")
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	err := r.e.LuksInit(ctx, s, func(p Progress) {
		if p.Total > 0 && p.Bytes > 0 {
			cancel() // the copy into sys-usb has begun
		}
	})
	if err == nil {
		t.Fatal("a canceled luks-init succeeded")
	}
	r.nothingLeft(t)
}

// A caller's entropy source that never delivers (a terminal nobody types into) does
// not hold a canceled luks-init: the cancel ends the read.
func TestLuksInitCanceledWhileEntropyBlocks(t *testing.T) {
	t.Parallel()
	r := luksRig(t)
	rd, wr, err := os.Pipe() // pollable, like the non-blocking descriptors qcryptd gets
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	defer wr.Close()
	s := initSpec("ext4")
	s.KeyEntropy = rd
	ctx, cancel := context.WithCancel(bg)
	done := make(chan error, 1)
	go func() {
		done <- r.e.LuksInit(ctx, s, func(p Progress) {
			if p.Desc == "build the container in dom0" {
				cancel() // keys are read next, from an entropy source that never delivers
			}
		})
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "cannot make keys") {
			t.Errorf("got %v, want the key read to end", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("a canceled luks-init still waits for its entropy")
	}
	if left := r.privateLeft(t); len(left) != 0 {
		t.Errorf("dom0 work files left: %v", left)
	}
}
