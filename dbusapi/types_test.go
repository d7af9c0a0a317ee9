package dbusapi

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"
)

func TestSpecFromMapRefuses(t *testing.T) {
	good := Spec{SourceVM: "sys-usb", File: "/c.luks", Key: "k", Destinations: []string{"mediator", "work"}}
	tests := map[string]struct {
		change func(*Spec)
		want   string
	}{
		"dom0 as destination":    {func(s *Spec) { s.Destinations = []string{"mediator", "dom0"} }, "dom0 is never part of a chain"},
		"dom0 as source":         {func(s *Spec) { s.SourceVM = "dom0" }, "dom0 is never part of a chain"},
		"relative file":          {func(s *Spec) { s.File = "c.luks" }, "must be absolute"},
		"bad key id":             {func(s *Spec) { s.Key = "../k" }, "must match"},
		"crypt options of other": {func(s *Spec) { s.CryptOptions = map[string]string{"sys-usb": "--type plain"} }, "not a destination"},
		"key store of other":     {func(s *Spec) { s.InjectKeystore = map[string]string{"sys-usb": "/etc/blib/keys"} }, "not a destination"},
		"key store not a path":   {func(s *Spec) { s.InjectKeystore = map[string]string{"work": "keys"} }, "inject_keystore of work: key store directory"},
		"key store above":        {func(s *Spec) { s.InjectKeystore = map[string]string{"work": "/srv/../etc"} }, "inject_keystore of work"},
	}
	if _, _, err := SpecFromMap(good.ToMap()); err != nil {
		t.Fatalf("good spec refused: %v", err)
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			s := good
			s.Destinations = append([]string{}, good.Destinations...)
			tc.change(&s)
			_, _, err := SpecFromMap(s.ToMap())
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want %q", err, tc.want)
			}
		})
	}
}

// isOpen reports whether fd is an open descriptor of this process.
func isOpen(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == nil
}

// openFiles lists this process' descriptors that refer to files (the runtime's own poll
// descriptors left out).
func openFiles(t *testing.T) map[string]string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name()))
		if err == nil && !strings.HasPrefix(target, "anon_inode:") {
			out[e.Name()] = target
		}
	}
	return out
}

// Descriptors a caller passes are checked for their kind and mode, and one file is taken
// once. They stay the connection's: an accepted spec holds duplicates, which its Close
// closes, and a refused one holds nothing.
func TestSpecDescriptors(t *testing.T) {
	dir := t.TempDir()
	open := func(name string, flag int, content string) int {
		p := filepath.Join(dir, name)
		if content != "" {
			if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		fd, err := unix.Open(p, flag|unix.O_CREAT, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		return fd
	}
	pipe := func() int {
		var p [2]int
		if err := unix.Pipe(p[:]); err != nil {
			t.Fatal(err)
		}
		unix.Close(p[1])
		return p[0]
	}
	base := Spec{SourceVM: "sys-usb", File: "/c.luks", Key: "k", Destinations: []string{"mediator", "work"}}.ToMap()
	with := func(extra map[string]dbus.Variant) map[string]dbus.Variant {
		m := map[string]dbus.Variant{}
		for k, v := range base {
			m[k] = v
		}
		for k, v := range extra {
			m[k] = v
		}
		return m
	}
	fdv := func(fd int) dbus.Variant { return dbus.MakeVariant(dbus.UnixFD(fd)) }
	tests := map[string]struct {
		fds   func() ([]int, map[string]dbus.Variant)
		want  string // "" = accepted
		check func(t *testing.T, s Spec)
	}{
		"key file read": {func() ([]int, map[string]dbus.Variant) {
			k := open("key", unix.O_RDONLY, "secret")
			return []int{k}, map[string]dbus.Variant{"inject": dbus.MakeVariant(map[string]dbus.Variant{"work": fdv(k)})}
		}, "", func(t *testing.T, s Spec) {
			if string(s.InjectKeys["work"]) != "secret" {
				t.Errorf("key %q", s.InjectKeys["work"])
			}
		}},
		"a pipe is no entropy source": {func() ([]int, map[string]dbus.Variant) {
			p := pipe()
			return []int{p}, map[string]dbus.Variant{"key_entropy": fdv(p)}
		}, "must be a readable file or character device", nil},
		"a backup must be new and writable": {func() ([]int, map[string]dbus.Variant) {
			b := open("old", unix.O_RDONLY, "old key")
			return []int{b}, map[string]dbus.Variant{"backups": dbus.MakeVariant(map[string]dbus.Variant{"work": fdv(b)})}
		}, "must be a new, empty regular file opened for writing", nil},
		"the same descriptor twice": {func() ([]int, map[string]dbus.Variant) {
			b := open("new", unix.O_WRONLY, "")
			return []int{b}, map[string]dbus.Variant{"backups": dbus.MakeVariant(map[string]dbus.Variant{"work": fdv(b), "mediator": fdv(b)})}
		}, "the same file is passed as backup for", nil},
		"one file under two descriptors": {func() ([]int, map[string]dbus.Variant) {
			b := open("new4", unix.O_WRONLY, "")
			c := open("new4", unix.O_RDWR, "")
			return []int{b, c}, map[string]dbus.Variant{"backups": dbus.MakeVariant(map[string]dbus.Variant{"work": fdv(b)}), "container_file": fdv(c)}
		}, "container_file: the same file is passed as backup for work", nil},
		"one device read twice": {func() ([]int, map[string]dbus.Variant) {
			a, err := unix.Open("/dev/urandom", unix.O_RDONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			b, err := unix.Open("/dev/urandom", unix.O_RDONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			return []int{a, b}, map[string]dbus.Variant{"key_entropy": fdv(a), "container_entropy": fdv(b)}
		}, "", func(t *testing.T, s Spec) {
			if s.KeyEntropy == nil || s.ContainerEntropy == nil {
				t.Errorf("entropy files not taken: %v %v", s.KeyEntropy, s.ContainerEntropy)
			}
		}},
		"a refusal elsewhere closes them all": {func() ([]int, map[string]dbus.Variant) {
			b := open("new2", unix.O_WRONLY, "")
			e := open("entropy", unix.O_RDONLY, "x")
			return []int{b, e}, map[string]dbus.Variant{"backups": dbus.MakeVariant(map[string]dbus.Variant{"mediator": fdv(b)}),
				"key_entropy": fdv(e), "destinations": dbus.MakeVariant([]string{"mediator", "dom0"})}
		}, "dom0 is never part of a chain", nil},
		"a backup for a qube that is no destination": {func() ([]int, map[string]dbus.Variant) {
			b := open("new3", unix.O_WRONLY, "")
			return []int{b}, map[string]dbus.Variant{"backups": dbus.MakeVariant(map[string]dbus.Variant{"sys-usb": fdv(b)})}
		}, "backups: sys-usb is not a destination", nil},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			before := openFiles(t)
			fds, extra := tc.fds()
			_, s, err := SpecFromMap(with(extra))
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				tc.check(t, s)
				s.Close()
			} else if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want %q", err, tc.want)
			}
			for _, fd := range fds {
				if !isOpen(fd) {
					t.Errorf("descriptor %d was closed: it is the connection's", fd)
				}
				unix.Close(fd)
			}
			if after := openFiles(t); len(after) != len(before) {
				t.Errorf("open files before %v, after %v", before, after)
			}
		})
	}
}
