package chains

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qcrypt/qcrypt/qubes/sim"
)

func initSpec(fs string) InitSpec {
	return InitSpec{
		Chain: &Chain{Name: "new", SourceVM: "sys-usb", SourceFile: "/home/user/vault/new.luks", Key: "newkey",
			Hops:       []Hop{{VM: "mediator", Options: []string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"}}, {VM: "work"}},
			MountPoint: "/mnt/new"},
		Size: 34 << 20, KeySize: 64, FS: fs, Autostart: true,
	}
}

func TestLuksInitThenOpen(t *testing.T) {
	for _, fs := range []string{"btrfs", "ext4"} {
		t.Run(fs, func(t *testing.T) {
			r := newRig(t, sim.R42)
			r.e.Dom0 = r.Dom0(r.Runner)
			spec := initSpec(fs)
			bak := "/root/qcrypt-backup"
			spec.BackupDir = bak
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
			// Backups in dom0: 0600, one per destination; the work dir is gone.
			dom0, _ := r.VM("dom0")
			for _, vm := range []string{"mediator", "work"} {
				st, err := os.Stat(filepath.Join(dom0.Root(), bak, vm+"_newkey"))
				if err != nil || st.Mode().Perm() != 0o600 || st.Size() != 64 {
					t.Errorf("backup of %s: %v %v", vm, st, err)
				}
			}
			if left, _ := filepath.Glob(filepath.Join(dom0.Root(), "tmp", "qcrypt-luks-init.*")); len(left) != 0 {
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
			if err := r.e.Close(bg, c, CloseOptions{}, nil); err != nil {
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
			r.e.Close(bg, c, CloseOptions{}, nil)
			if err := r.e.LuksInit(bg, initSpec(fs), nil); err == nil || !strings.Contains(err.Error(), "never overwritten") {
				t.Errorf("second luks-init: %v", err)
			}
		})
	}
}

func TestLuksInitRefusesAndLeavesNothing(t *testing.T) {
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
		"existing backup": {func(t *testing.T, r *rig, s *InitSpec) {
			s.BackupDir = "/root/bak"
			dom0, _ := r.VM("dom0")
			os.MkdirAll(filepath.Join(dom0.Root(), "root/bak"), 0o700)
			os.WriteFile(filepath.Join(dom0.Root(), "root/bak/work_newkey"), []byte("old"), 0o600)
		}, "key backup exists already"},
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
			r := newRig(t, sim.R42)
			r.e.Dom0 = r.Dom0(r.Runner)
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
			dom0, _ := r.VM("dom0")
			if left, _ := filepath.Glob(filepath.Join(dom0.Root(), "tmp", "qcrypt-luks-init.*")); len(left) != 0 {
				t.Errorf("dom0 work files left: %v", left)
			}
		})
	}
}

func TestParseSize(t *testing.T) {
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
