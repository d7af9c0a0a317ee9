package dbusapi_test

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"

	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/dbusapi/dbustest"
)

// guarded is a service on a guarded connection: Take reports the file a descriptor
// refers to and which descriptor number it came as; Plain takes none.
type guarded struct{ got chan int }

func (g guarded) Take(fd dbus.UnixFD) (string, *dbus.Error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(fd), &st); err != nil {
		return "", dbus.MakeFailedError(err)
	}
	select {
	case g.got <- int(fd):
	default:
	}
	return fmt.Sprintf("%d:%d", st.Dev, st.Ino), nil
}

func (guarded) Plain() *dbus.Error { return nil }

func closed(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == unix.EBADF
}

// countFiles counts this process' descriptors that refer to files (the runtime's poll
// descriptors left out).
func countFiles(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && !strings.HasPrefix(target, "anon_inode:") {
			n++
		}
	}
	return n
}

// Every descriptor that comes with a message to a guarded connection is closed exactly
// once: those no handler takes when the message is answered or dropped, those a handler
// takes when it has returned; none stays open, whatever the message.
func TestGuardClosesEveryDescriptor(t *testing.T) {
	dbustest.Need(t)
	addr, stop, err := dbustest.Start(t.TempDir(), dbustest.Permissive)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", addr)
	srv, err := dbusapi.ConnectServer()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	svc := guarded{got: make(chan int, 1)}
	const iface, path = "org.qcrypt.Test", dbus.ObjectPath("/org/qcrypt/Test")
	if err := srv.Export(svc, path, iface); err != nil {
		t.Fatal(err)
	}

	raw, err := dbustest.DialRaw(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	file, err := os.Open("/etc/hostname")
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(file.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	fds := make([]int, 16)
	for i := range fds {
		fds[i] = int(file.Fd())
	}
	me := srv.Names()[0]

	// A handler gets the descriptor the body names, valid while it runs, and it is
	// closed once the call is answered.
	serial, err := raw.Send(dbustest.Call(me, path, iface, "Take", dbus.UnixFDIndex(3)), fds)
	if err != nil {
		t.Fatal(err)
	}
	m, err := raw.Reply(serial, time.Minute)
	if err != nil || m.Type != dbus.TypeMethodReply || len(m.Body) != 1 || m.Body[0] != fmt.Sprintf("%d:%d", st.Dev, st.Ino) {
		t.Fatalf("Take answered %v (%v)", m, err)
	}
	if fd := <-svc.got; !closed(fd) {
		t.Errorf("descriptor %d the handler got is still open after the answer", fd)
	}

	base := countFiles(t)
	type flood struct {
		name    string
		msg     func() *dbus.Message
		answers bool // qcryptd answers it (else it is dropped, or passed over)
	}
	floods := []flood{
		{"Peer.Ping", func() *dbus.Message {
			return dbustest.Call(me, path, "org.freedesktop.DBus.Peer", "Ping")
		}, true},
		{"an unknown method", func() *dbus.Message { return dbustest.Call(me, path, iface, "Nothing") }, true},
		{"an unknown interface", func() *dbus.Message { return dbustest.Call(me, path, "org.qcrypt.Nothing", "Take") }, true},
		{"an unknown object", func() *dbus.Message { return dbustest.Call(me, "/nowhere", iface, "Take") }, true},
		{"a wrong signature", func() *dbus.Message { return dbustest.Call(me, path, iface, "Take", "x") }, true},
		{"a method without descriptors", func() *dbus.Message { return dbustest.Call(me, path, iface, "Plain") }, true},
		{"an index past the descriptors", func() *dbus.Message {
			return dbustest.Call(me, path, iface, "Take", dbus.UnixFDIndex(99))
		}, true},
		{"Introspect", func() *dbus.Message {
			return dbustest.Call(me, path, "org.freedesktop.DBus.Introspectable", "Introspect")
		}, true},
		{"Properties.GetAll", func() *dbus.Message {
			return dbustest.Call(me, path, "org.freedesktop.DBus.Properties", "GetAll", iface)
		}, true},
		{"a call that wants no reply", func() *dbus.Message {
			m := dbustest.Call(me, path, iface, "Take", dbus.UnixFDIndex(0))
			m.Flags |= dbus.FlagNoReplyExpected
			return m
		}, false},
		{"a signal", func() *dbus.Message {
			m := dbustest.Call(me, path, iface, "Signal")
			m.Type = dbus.TypeSignal
			return m
		}, false},
	}
	const rounds = 100 // below the bus's 128 calls awaiting an answer per connection
	for _, f := range floods {
		t.Run(f.name, func(t *testing.T) {
			for i := 0; i < rounds; i++ {
				if _, err := raw.Send(f.msg(), fds); err != nil {
					t.Fatal(err)
				}
			}
			if f.answers {
				if _, err := raw.Drain(rounds, time.Minute); err != nil {
					t.Fatal(err)
				}
			}
			// A ping behind them: by its answer every message before it was read and
			// dispatched (or dropped) in order.
			serial, err := raw.Send(dbustest.Call(me, path, "org.freedesktop.DBus.Peer", "Ping"), nil)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := raw.Reply(serial, time.Minute); err != nil {
				t.Fatal(err)
			}
			if n := countFiles(t); n != base {
				t.Errorf("%d descriptors open after %d messages with %d each, %d before", n, rounds, len(fds), base)
			}
		})
	}
}
