// fdflood is test equipment: an attacker who sends qcryptd messages that carry
// descriptors, ROUNDS of each kind, 16 descriptors per message whether the message
// refers to them or not: pings, introspection, property reads, unknown and refused
// calls, wrong signatures, one descriptor named in a spec and in the options, signals
// and calls that want no reply. It reads every answer, then prints how many messages
// it sent and how many answers were errors.
package main

import (
	"fmt"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/dbusapi/dbustest"
)

// batch stays below the bus' limit of calls awaiting an answer per connection (128).
const batch = 100

func main() {
	rounds, err := strconv.Atoi(os.Args[len(os.Args)-1])
	if err != nil || len(os.Args) != 2 {
		fail(fmt.Errorf("usage: fdflood ROUNDS"))
	}
	raw, err := dbustest.DialRaw(os.Getenv("DBUS_SYSTEM_BUS_ADDRESS"))
	if err != nil {
		fail(err)
	}
	null, err := syscall.Open("/dev/null", syscall.O_RDONLY, 0)
	if err != nil {
		fail(err)
	}
	fds := make([]int, 16)
	for i := range fds {
		fds[i] = null
	}
	serial, err := raw.Send(dbustest.Call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "GetNameOwner", dbusapi.BusName), nil)
	if err != nil {
		fail(err)
	}
	owner, err := raw.Reply(serial, time.Minute)
	if err != nil || len(owner.Body) != 1 {
		fail(fmt.Errorf("no owner of %s: %v %v", dbusapi.BusName, owner, err))
	}
	unique, _ := owner.Body[0].(string)

	mgr, name := dbusapi.ManagerPath, dbusapi.BusName
	fd := func(i uint32) dbus.Variant { return dbus.MakeVariant(dbus.UnixFDIndex(i)) }
	spec := map[string]dbus.Variant{"source_vm": dbus.MakeVariant("sys-usb"), "file": dbus.MakeVariant("/home/user/demo.luks"),
		"key": dbus.MakeVariant("demo"), "destinations": dbus.MakeVariant([]string{"mediator", "work"}),
		"inject": dbus.MakeVariant(map[string]dbus.Variant{"work": fd(0)})}
	options := map[string]dbus.Variant{"force": fd(0)}
	kinds := []struct {
		msg      *dbus.Message
		answered bool
	}{
		{dbustest.Call(name, mgr, "org.freedesktop.DBus.Peer", "Ping"), true},
		{dbustest.Call(name, mgr, "org.freedesktop.DBus.Introspectable", "Introspect"), true},
		{dbustest.Call(name, mgr+"/chain", "org.freedesktop.DBus.Introspectable", "Introspect"), true},
		{dbustest.Call(name, mgr, "org.freedesktop.DBus.Properties", "GetAll", dbusapi.ManagerInterface), true},
		{dbustest.Call(name, mgr, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"), true},
		{dbustest.Call(name, mgr, dbusapi.ManagerInterface, "ListChains"), true},
		{dbustest.Call(name, mgr, dbusapi.ManagerInterface, "NoSuchMethod"), true},
		{dbustest.Call(name, mgr, "org.qcrypt.NoSuchInterface", "Open"), true},
		{dbustest.Call(name, mgr, dbusapi.ManagerInterface, "Open", "demo"), true}, // wrong signature
		{dbustest.Call(name, mgr, dbusapi.ManagerInterface, "Open", "demo", options), true},
		{dbustest.Call(name, mgr, dbusapi.ManagerInterface, "OpenAdhoc", spec, options), true},
		{dbustest.Call(name, mgr, dbusapi.ManagerInterface, "Plan", "open", "", spec, options), true},
		{dbustest.Call(name, mgr, dbusapi.ManagerInterface, "StatusAdhoc", spec), true},
		{dbustest.Call(unique, mgr, dbusapi.ManagerInterface, "ChainStateChanged"), false}, // a signal, below
		{dbustest.Call(name, mgr, "org.freedesktop.DBus.Peer", "Ping"), false},             // no reply wanted, below
	}
	kinds[len(kinds)-2].msg.Type = dbus.TypeSignal
	kinds[len(kinds)-1].msg.Flags |= dbus.FlagNoReplyExpected

	sent, errs := 0, 0
	for _, k := range kinds {
		for left := rounds; left > 0; left -= batch {
			n := min(left, batch)
			for i := 0; i < n; i++ {
				m := *k.msg
				m.Headers = map[dbus.HeaderField]dbus.Variant{}
				for h, v := range k.msg.Headers {
					m.Headers[h] = v
				}
				if _, err := raw.Send(&m, fds); err != nil {
					fail(err)
				}
			}
			sent += n
			if k.answered {
				e, err := raw.Drain(n, 2*time.Minute)
				if err != nil {
					fail(err)
				}
				errs += e
			}
		}
	}
	// A ping behind them all: by its answer qcryptd has read every one.
	serial, err = raw.Send(dbustest.Call(name, mgr, "org.freedesktop.DBus.Peer", "Ping"), nil)
	if err != nil {
		fail(err)
	}
	if _, err := raw.Reply(serial, 2*time.Minute); err != nil {
		fail(err)
	}
	fmt.Printf("sent %d messages with %d descriptors each; %d answers were errors\n", sent, len(fds), errs)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "fdflood:", err)
	os.Exit(1)
}
