package dbusapi

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
	if _, err := exec.LookPath("dbus-daemon"); err != nil {
		if os.Getenv("QCRYPT_REQUIRE_SANDBOX") == "1" {
			t.Fatal("dbus-daemon is needed (make deps)")
		}
		t.Skip("no dbus-daemon")
	}
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
	cfg := filepath.Join(dir, "bus.conf")
	conf := `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>session</type><listen>unix:path=` + dir + `/bus.sock</listen><auth>EXTERNAL</auth><servicedir>` + services + `</servicedir>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/></policy></busconfig>`
	if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	bus := exec.Command("dbus-daemon", "--config-file="+cfg, "--nofork", "--print-address")
	out, err := bus.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := bus.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bus.Process.Kill(); _ = bus.Wait() })
	addr, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", strings.TrimSpace(addr))
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
