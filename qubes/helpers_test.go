package qubes_test

import (
	"net"
	"os"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
)

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

type rawEvents struct {
	c  net.Conn
	er *qubes.EventReader
}

func dialEvents(t *testing.T, socket, dest string) *rawEvents {
	t.Helper()
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("admin.Events+ dom0 name " + dest + "\x00")); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.UnixConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if err := c.SetReadDeadline(time.Now().Add(30 * time.Second)); err != nil {
		t.Fatal(err)
	}
	r := &rawEvents{c: c, er: qubes.NewEventReader(c)}
	if ev := r.next(t); ev.Kind != qubes.EventResync {
		t.Fatalf("first record %q", ev.Name)
	}
	return r
}

func (r *rawEvents) next(t *testing.T) qubes.Event {
	t.Helper()
	ev, err := r.er.Next()
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

func (r *rawEvents) close() { r.c.Close() }

// checked reports err on t without stopping: the call may run on a subtest's goroutine.
func checked(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Error(err)
	}
}
