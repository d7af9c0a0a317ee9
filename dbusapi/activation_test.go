package dbusapi

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/godbus/dbus/v5"

	"github.com/qcrypt/qcrypt/dbusapi/dbustest"
	"github.com/qcrypt/qcrypt/systemd"
)

// standInEnv makes the test binary a stand-in qcryptd that systemd starts: it owns the
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

// activatingBus runs a system bus as dom0's: a service directory with the activation
// file make install installs (when shipped), and systemd (a stand-in) starting
// qcryptd.service as the stand-in qcryptd. On either bus an activation goes through
// the file's SystemdService=.
func activatingBus(t *testing.T, shipped bool) *dbustest.Systemd {
	t.Helper()
	dbustest.Need(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	services := filepath.Join(dir, "services")
	if err := os.Mkdir(services, 0o755); err != nil {
		t.Fatal(err)
	}
	if shipped {
		if err := os.WriteFile(filepath.Join(services, BusName+".service"), []byte(systemd.Activation), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	addr, stop, err := dbustest.StartConfig(dir, dbustest.Config{Policy: dbustest.Permissive, ServiceDir: services,
		SystemdActivation: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", addr)
	sd, err := dbustest.StartSystemd(addr, map[string]func() *exec.Cmd{
		"qcryptd.service": func() *exec.Cmd {
			cmd := exec.Command(self)
			cmd.Env = append(os.Environ(), standInEnv+"=1")
			return cmd
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sd.Stop)
	return sd
}

// qcryptctl starts qcryptd through the bus when it is not running; where the bus cannot,
// the answer is "not running". Under QCRYPT_TEST_BUS=dbus-broker this is dom0's bus.
func TestConnectActivates(t *testing.T) {
	t.Run("activatable", func(t *testing.T) {
		sd := activatingBus(t, true)
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
		if got := sd.Started(); len(got) != 1 || got[0] != "qcryptd.service" {
			t.Errorf("units started: %v, want [qcryptd.service] once", got)
		}
	})
	t.Run("not activatable", func(t *testing.T) {
		sd := activatingBus(t, false)
		if _, err := Connect(); !errors.Is(err, ErrNotRunning) {
			t.Errorf("connect: %v, want ErrNotRunning", err)
		}
		if got := sd.Started(); len(got) != 0 {
			t.Errorf("units started: %v", got)
		}
	})
}
