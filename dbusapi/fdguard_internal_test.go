package dbusapi

import (
	"bytes"
	"encoding/binary"
	"net"
	"os"
	"testing"

	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"
)

// godbus passes over messages to a name it does not know yet (one it was just given):
// it never dispatches them, so the guard closes their descriptors when it dispatches a
// later message; the descriptors of the dispatched call are closed when it is answered.
func TestGuardClosesWhatGodbusPassesOver(t *testing.T) {
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conn := func(fd int) *net.UnixConn {
		f := os.NewFile(uintptr(fd), "socket")
		defer f.Close()
		c, err := net.FileConn(f)
		if err != nil {
			t.Fatal(err)
		}
		return c.(*net.UnixConn)
	}
	bus, ours := conn(pair[0]), conn(pair[1])
	defer bus.Close()
	g := newFDGuard(ours)
	defer g.Close()
	g.messages = true // authenticated

	file, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	send := func(serial uint32, dest string, fds int) {
		m := &dbus.Message{Type: dbus.TypeMethodCall, Headers: map[dbus.HeaderField]dbus.Variant{
			dbus.FieldDestination: dbus.MakeVariant(dest), dbus.FieldPath: dbus.MakeVariant(dbus.ObjectPath("/x")),
			dbus.FieldMember: dbus.MakeVariant("Take"), dbus.FieldSender: dbus.MakeVariant(":1.9"),
			dbus.FieldUnixFDs: dbus.MakeVariant(uint32(fds)), dbus.FieldSignature: dbus.MakeVariant(dbus.SignatureOf(dbus.UnixFDIndex(0))),
		}, Body: []any{dbus.UnixFDIndex(0)}}
		var buf bytes.Buffer
		if err := m.EncodeTo(&buf, binary.LittleEndian); err != nil {
			t.Fatal(err)
		}
		b := buf.Bytes()
		binary.LittleEndian.PutUint32(b[8:12], serial)
		rights := make([]int, fds)
		for i := range rights {
			rights[i] = int(file.Fd())
		}
		if _, _, err := bus.WriteMsgUnix(b, unix.UnixRights(rights...), nil); err != nil {
			t.Fatal(err)
		}
	}
	read := func() *dbus.Message {
		m, err := dbus.DecodeMessage(g)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	send(1, "org.qcrypt.New", 4)
	send(2, "org.qcrypt.New", 4)
	send(3, ":1.1", 4)
	passed := []*dbus.Message{read(), read()}
	dispatched := read()
	open := func(m *dbus.Message) []int {
		var fds []int
		g.mu.Lock()
		defer g.mu.Unlock()
		for _, e := range g.queue {
			if e.key == keyOf(m) {
				fds = append(fds, e.fds...)
			}
		}
		fds = append(fds, g.owned[keyOf(m)]...)
		return fds
	}
	passedFDs := append(open(passed[0]), open(passed[1])...)
	if len(passedFDs) != 8 {
		t.Fatalf("the guard holds %d descriptors of the two passed-over calls, want 8", len(passedFDs))
	}
	g.claim(dispatched)
	for _, fd := range passedFDs {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err == nil {
			t.Errorf("descriptor %d of a passed-over call is open", fd)
		}
	}
	arg, ok := dispatched.Body[0].(dbus.UnixFD)
	if !ok {
		t.Fatalf("the dispatched call's argument is %T, want a descriptor", dispatched.Body[0])
	}
	if _, err := unix.FcntlInt(uintptr(arg), unix.F_GETFD, 0); err != nil {
		t.Fatalf("the dispatched call's descriptor is not open while it is handled: %v", err)
	}
	reply := &dbus.Message{Type: dbus.TypeMethodReply, Headers: map[dbus.HeaderField]dbus.Variant{
		dbus.FieldDestination: dbus.MakeVariant(":1.9"), dbus.FieldReplySerial: dbus.MakeVariant(uint32(3))}}
	g.release(reply)
	if _, err := unix.FcntlInt(uintptr(arg), unix.F_GETFD, 0); err == nil {
		t.Errorf("the dispatched call's descriptor is open after its answer")
	}
	if len(g.queue) != 0 || len(g.owned) != 0 || len(g.pending) != 0 {
		t.Errorf("the guard still holds: queue %v, owned %v, pending %v", g.queue, g.owned, g.pending)
	}
}
