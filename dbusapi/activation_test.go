package dbusapi

import (
	"errors"
	"fmt"
	"github.com/qcrypt/qcrypt/dbusapi/dbustest"
	"os"
	"path/filepath"
	"testing"

	"github.com/godbus/dbus/v5"
)

// standInEnv makes the test binary a stand-in qcryptd that a bus activates: it owns the
// name and waits until the bus goes away.
const standInEnv = "QCRYPT_TEST_ACTIVATED"

func TestMain(m *testing.M) {
	if os.Getenv(standInEnv) == "1" {
		conn, err := dbus.ConnectSystemBus() // DBUS_SYSTEM_BUS_ADDRESS: the activating bus
		if err == nil {
			_, err = conn.RequestName(BusName, dbus.NameFlagDoNotQueue)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "stand-in qcryptd:", err)
			os.Exit(1)
		}
		<-conn.Context().Done()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// activatingBus runs a dbus-daemon whose service directory says how to start qcryptd
// (exec: how the bus hands it to systemd on a dom0, without systemd here).
func activatingBus(t *testing.T, starter string) {
	t.Helper()
	dbustest.Need(t)
	dir := t.TempDir()
	services := filepath.Join(dir, "services")
	if err := os.Mkdir(services, 0o755); err != nil {
		t.Fatal(err)
	}
	if starter != "" {
		file := "[D-BUS Service]\nName=" + BusName + "\nExec=" + starter + "\n"
		if err := os.WriteFile(filepath.Join(services, BusName+".service"), []byte(file), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A session-type bus starts services itself (a system one through a setuid helper).
	addr, stop, err := dbustest.StartConfig(dir, dbustest.Config{Type: "session", Policy: dbustest.Permissive, ServiceDir: services})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", addr)
}

// qcryptctl starts qcryptd through the bus when it is not running; where the bus cannot,
// the answer is "not running".
func TestConnectActivates(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Run("activatable", func(t *testing.T) {
		// The bus starts services with its own environment: the stand-in is told by a
		// wrapper script.
		script := filepath.Join(t.TempDir(), "qcryptd")
		if err := os.WriteFile(script, []byte("#!/bin/sh\nexport "+standInEnv+"=1 DBUS_SYSTEM_BUS_ADDRESS=\"$DBUS_STARTER_ADDRESS\"\nexec "+self+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		activatingBus(t, script)
		// A question that must not start it (completion, an offline-able check) does not.
		if _, err := ConnectRunning(); !errors.Is(err, ErrNotRunning) {
			t.Fatalf("ConnectRunning: %v, want ErrNotRunning (qcryptd started?)", err)
		}
		c, err := Connect()
		if err != nil {
			t.Fatalf("connect: %v", err)
		}
		defer c.Disconnect()
		if owner, err := c.owner(); err != nil || owner == "" {
			t.Errorf("qcryptd's name has no owner after the connect: %q %v", owner, err)
		}
	})
	t.Run("not activatable", func(t *testing.T) {
		activatingBus(t, "")
		if _, err := Connect(); !errors.Is(err, ErrNotRunning) {
			t.Errorf("connect: %v, want ErrNotRunning", err)
		}
	})
}
