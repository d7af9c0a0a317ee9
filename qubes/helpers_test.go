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
	c.Write([]byte("admin.Events+ dom0 name " + dest + "\x00"))
	c.(*net.UnixConn).CloseWrite()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
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
