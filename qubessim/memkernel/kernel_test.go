package memkernel

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/qcrypt/qcrypt/qubessim/kernelcall"
)

// host is a world of one qube whose devices may be attached to "work".
type host struct {
	root, stash string
	attached    map[string]bool // ports attached to work
	events      []string
}

func (h *host) Name() string           { return "sys-usb" }
func (h *host) Root() string           { return h.root }
func (h *host) StashDir() string       { return h.stash }
func (h *host) DeviceAdded()           { h.events = append(h.events, "added") }
func (h *host) DeviceRemoved(p string) { h.events = append(h.events, "removed "+p) }
func (h *host) AttachedTo(p string) string {
	if h.attached[p] {
		return "work"
	}
	return ""
}

func newHost(t *testing.T) *host {
	h := &host{root: t.TempDir(), stash: t.TempDir(), attached: map[string]bool{}}
	if err := os.MkdirAll(filepath.Join(h.root, "home/user"), 0o755); err != nil {
		t.Fatal(err)
	}
	return h
}

func call(t *testing.T, k *Kernel, req kernelcall.Request, wantCode int) kernelcall.Response {
	t.Helper()
	resp := k.Call(req)
	if resp.Code != wantCode {
		t.Fatalf("%s: code %d (%s), want %d", req.Op, resp.Code, resp.Msg, wantCode)
	}
	return resp
}

// The path the fake tools take through a qube's kernel: a container file becomes a
// loop device, a LUKS layer opens only with its key, a device attached to another
// qube or carrying a mapping is busy, and the world hears of every exposed device.
func TestKernelCalls(t *testing.T) {
	h := newHost(t)
	if err := WriteContainer(filepath.Join(h.root, "home/user/c.luks"), 8<<20, [][]byte{[]byte("outer key")}, "ext4"); err != nil {
		t.Fatal(err)
	}
	k := New(h)
	loop := call(t, k, kernelcall.Request{Op: kernelcall.LoopSetup, File: "/home/user/c.luks"}, 0).Dev
	if loop != "/dev/loop0" || !slices.Equal(h.events, []string{"added"}) {
		t.Fatalf("loop %q, events %v", loop, h.events)
	}
	// The loop device is the qube's; its node list says so.
	if devs := call(t, k, kernelcall.Request{Op: kernelcall.Devices}, 0).Devices; len(devs) != 1 || devs[0].Name != "loop0" || devs[0].UUID == "" {
		t.Errorf("devices %+v", devs)
	}
	call(t, k, kernelcall.Request{Op: kernelcall.CryptOpen, Dev: loop, Name: "vault", Key: []byte("wrong")}, 2)
	call(t, k, kernelcall.Request{Op: kernelcall.CryptOpen, Dev: loop, Name: "vault", Key: []byte("outer key")}, 0)
	st := call(t, k, kernelcall.Request{Op: kernelcall.CryptStatus, Name: "vault"}, 0).Crypt
	if st == nil || st.Device != loop || st.Type != "LUKS2" || st.InUse {
		t.Errorf("status %+v", st)
	}
	// The loop device carries the mapping: it cannot be formatted.
	call(t, k, kernelcall.Request{Op: kernelcall.LuksFormat, Dev: loop, Key: []byte("k")}, 5)
	// A mapping attached to another qube cannot be closed.
	h.attached["dm-0"] = true
	if resp := k.Call(kernelcall.Request{Op: kernelcall.CryptClose, Name: "vault"}); resp.Code == 0 {
		t.Error("closed a mapping attached to work")
	}
	h.attached["dm-0"] = false
	call(t, k, kernelcall.Request{Op: kernelcall.CryptClose, Name: "vault"}, 0)
	call(t, k, kernelcall.Request{Op: kernelcall.LoopDetach, Dev: loop}, 0)
	if want := []string{"added", "added", "removed dm-0", "removed loop0"}; !slices.Equal(h.events, want) {
		t.Errorf("events %v, want %v", h.events, want)
	}
	call(t, k, kernelcall.Request{Op: "format-everything"}, 1)
}

// A device attached from another qube fails once its attachment is stale, as a Xen
// blkfront whose backend vanished; a detach waits until nothing uses it.
func TestAttachedDevices(t *testing.T) {
	h := newHost(t)
	if err := WriteContainer(filepath.Join(h.root, "home/user/c.luks"), 8<<20, [][]byte{[]byte("k")}, "ext4"); err != nil {
		t.Fatal(err)
	}
	usb := New(h)
	call(t, usb, kernelcall.Request{Op: kernelcall.LoopSetup, File: "/home/user/c.luks"}, 0)
	work := New(newHost(t))
	stale := false
	if err := work.Attach("xvdi", usb, "loop0", func() (bool, bool) { return stale, false }); err != nil {
		t.Fatal(err)
	}
	call(t, work, kernelcall.Request{Op: kernelcall.CryptOpen, Dev: "/dev/xvdi", Name: "v", Key: []byte("k")}, 0)
	if err := work.Detach("xvdi"); err == nil {
		t.Error("detached a device a mapping uses")
	}
	stale = true
	if resp := work.Call(kernelcall.Request{Op: kernelcall.IsLuks, Dev: "/dev/xvdi"}); resp.Code == 0 {
		t.Error("read a stale attachment")
	}
	call(t, work, kernelcall.Request{Op: kernelcall.CryptClose, Name: "v"}, 0)
	if err := work.Detach("xvdi"); err != nil {
		t.Error(err)
	}
}

// A plugged disk reports the description it was given, an empty one too (a bare
// device of real-qubesd's block-add); DiskDesc is what udev says of a USB disk.
func TestPlugDiskDescriptions(t *testing.T) {
	h := newHost(t)
	img := filepath.Join(t.TempDir(), "usb.img")
	if err := MakeDiskImage(img, 4<<20, "BACKUP", nil); err != nil {
		t.Fatal(err)
	}
	if got := DiskDesc(img); got != "QEMU_HARDDISK (BACKUP)" {
		t.Errorf("DiskDesc = %q", got)
	}
	k := New(h)
	if port, err := k.PlugDisk(img, "", "", "", true); err != nil || port != "sda" {
		t.Fatalf("plug: %q %v", port, err)
	}
	if _, err := k.PlugDisk(img, "sda", "x", "", true); err == nil {
		t.Error("plugged a second disk at sda")
	}
	if devs := k.Exposed(); len(devs) != 1 || devs[0].Desc != "" || !devs[0].RO {
		t.Errorf("exposed %+v", devs)
	}
}
