package dbusapi

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/godbus/dbus/v5"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/qcrypt/qcrypt/chains"
)

// acceptingBackend takes every job (closing what a luks-init is given, as the daemon
// does when the job ends).
type acceptingBackend struct{ Backend }

func (acceptingBackend) Open(uint32, string, chains.OpenOptions) (uint64, error)   { return 1, nil }
func (acceptingBackend) Close(uint32, string, chains.CloseOptions) (uint64, error) { return 1, nil }
func (acceptingBackend) OpenAdhoc(uint32, *chains.Chain, chains.OpenOptions) (uint64, error) {
	return 1, nil
}
func (acceptingBackend) CloseAdhoc(uint32, *chains.Chain, chains.CloseOptions) (uint64, error) {
	return 1, nil
}
func (acceptingBackend) StatusAdhoc(context.Context, *chains.Chain) (*chains.Status, error) {
	return &chains.Status{}, nil
}
func (acceptingBackend) Plan(JobOperation, string, *chains.Chain, chains.OpenOptions, chains.CloseOptions) (chains.Plan, error) {
	return nil, nil
}
func (acceptingBackend) LuksInit(_ uint32, _ chains.InitSpec, release func()) (uint64, error) {
	release()
	return 1, nil
}

// One owner per message: a handler never closes a descriptor it was given (the
// connection closes each once, after the handler), whether it takes it, refuses it,
// or finds it named twice, in the spec and in the options.
func TestHandlersLeaveDescriptorsToTheConnection(t *testing.T) {
	conn := connect(t, privateBus(t))
	s := NewServer(conn, acceptingBackend{}, logrus.NewEntry(logrus.New()))
	m := &manager{s}
	me := dbus.Sender(conn.Names()[0])
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "key")
	if err := os.WriteFile(keyFile, []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	key, err := unix.Open(keyFile, unix.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(key)
	backup, err := unix.Open(filepath.Join(dir, "backup"), unix.O_WRONLY|unix.O_CREAT, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(backup)
	fd := func(n int) dbus.Variant { return dbus.MakeVariant(dbus.UnixFD(n)) }
	spec := Spec{SourceVM: "sys-usb", File: "/c.luks", Key: "k", Destinations: []string{"mediator", "work"}}.ToMap()
	spec["inject"] = dbus.MakeVariant(map[string]dbus.Variant{"work": fd(key)})
	initSpec := Spec{SourceVM: "sys-usb", File: "/c.luks", Key: "k", Destinations: []string{"mediator", "work"}, Size: 1 << 30}.ToMap()
	initSpec["backups"] = dbus.MakeVariant(map[string]dbus.Variant{"work": fd(backup)})
	twice := map[string]dbus.Variant{"force": fd(key)} // the spec's descriptor again
	calls := map[string]func() *dbus.Error{
		"Open": func() *dbus.Error { _, err := m.Open(me, "demo", twice); return err },
		"Close": func() *dbus.Error {
			_, err := m.Close(me, "demo", map[string]dbus.Variant{"force": fd(key)})
			return err
		},
		"OpenAdhoc, taken":             func() *dbus.Error { _, err := m.OpenAdhoc(me, spec, nil); return err },
		"OpenAdhoc, named twice":       func() *dbus.Error { _, err := m.OpenAdhoc(me, spec, twice); return err },
		"CloseAdhoc, named twice":      func() *dbus.Error { _, err := m.CloseAdhoc(me, spec, twice); return err },
		"StatusAdhoc":                  func() *dbus.Error { _, err := m.StatusAdhoc(me, spec); return err },
		"Plan, named twice":            func() *dbus.Error { _, err := m.Plan(me, "open", "", spec, twice); return err },
		"Plan of a chain, with a spec": func() *dbus.Error { _, err := m.Plan(me, "close", "demo", spec, twice); return err },
		"LuksInit, taken":              func() *dbus.Error { _, err := m.LuksInit(me, initSpec); return err },
		"LuksInit, refused":            func() *dbus.Error { _, err := m.LuksInit(me, spec); return err },
	}
	for name, call := range calls {
		t.Run(name, func(t *testing.T) {
			err := call()
			t.Logf("answer: %v", err)
			for _, n := range []int{key, backup} {
				if _, err := unix.FcntlInt(uintptr(n), unix.F_GETFD, 0); err != nil {
					t.Errorf("descriptor %d was closed by the handler: %v", n, err)
				}
			}
		})
	}
}
