// Package dbustest runs a private bus (system-bus configuration unless told otherwise),
// for tests that talk to qcryptd, or act as it, over a real bus. The bus is dbus-daemon,
// or dbus-broker (dom0's bus) when QCRYPT_TEST_BUS=dbus-broker.
package dbustest

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Permissive is a bus policy that lets everyone own and call everything.
const Permissive = `<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/></policy>`

// SystemPolicy is the stock system bus' default policy (dbus' system.conf) plus the
// policy file at path, as on a machine where that file is installed.
func SystemPolicy(path string) string {
	return `<policy context="default"><allow user="*"/><deny own="*"/><deny send_type="method_call"/>
<allow send_type="signal"/><allow send_requested_reply="true" send_type="method_return"/><allow send_requested_reply="true" send_type="error"/>
<allow receive_type="method_call"/><allow receive_type="method_return"/><allow receive_type="error"/><allow receive_type="signal"/>
<allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
<allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/></policy>
<include>` + path + `</include>`
}

// Config is one private bus: its type (default system), its policy (busconfig
// elements) and, for D-Bus activation, a directory of service files. With
// SystemdActivation, dbus-daemon hands activations to systemd (a Systemd stand-in) as
// on a systemd machine; dbus-broker always does.
type Config struct {
	Type, Policy, ServiceDir string
	SystemdActivation        bool
}

// The bus implementations; QCRYPT_TEST_BUS picks one (default DBusDaemon).
const (
	DBusDaemon = "dbus-daemon"
	DBusBroker = "dbus-broker"
)

// Implementation is the bus the tests of this process run.
func Implementation() string {
	if os.Getenv("QCRYPT_TEST_BUS") == DBusBroker {
		return DBusBroker
	}
	return DBusDaemon
}

// Need skips t where the bus cannot run, or fails it under make check
// (QCRYPT_REQUIRE_SANDBOX=1).
func Need(t testing.TB) {
	t.Helper()
	tools := []string{"dbus-daemon"}
	if Implementation() == DBusBroker {
		tools = []string{"dbus-broker-launch", "bwrap"}
	}
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("QCRYPT_REQUIRE_SANDBOX") == "1" {
				t.Fatalf("%s is needed (make deps)", tool)
			}
			t.Skipf("no %s", tool)
		}
	}
}

// Start runs a system-type bus with policy, its socket and configuration in dir. It
// returns the bus address and a function that stops the bus.
func Start(dir, policy string) (addr string, stop func(), err error) {
	return StartConfig(dir, Config{Policy: policy})
}

// StartConfig runs a bus as c says, its socket and configuration in dir.
func StartConfig(dir string, c Config) (addr string, stop func(), err error) {
	if c.Type == "" {
		c.Type = "system"
	}
	services := ""
	if c.ServiceDir != "" {
		services = "<servicedir>" + c.ServiceDir + "</servicedir>"
	}
	cfg := filepath.Join(dir, "bus.conf")
	busSock := filepath.Join(dir, "bus.sock")
	err = os.WriteFile(cfg, []byte(`<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>`+c.Type+`</type><listen>unix:path=`+busSock+`</listen><auth>EXTERNAL</auth>`+services+c.Policy+`</busconfig>`), 0o644)
	if err != nil {
		return "", nil, fmt.Errorf("cannot write the bus configuration: %w", err)
	}
	if Implementation() == DBusBroker {
		return startBroker(dir, cfg, busSock, c.Type)
	}
	args := []string{"--config-file=" + cfg, "--nofork", "--print-address"}
	if c.SystemdActivation {
		args = append(args, "--systemd-activation")
	}
	bus := exec.Command("dbus-daemon", args...)
	out, err := bus.StdoutPipe()
	if err != nil {
		return "", nil, err
	}
	bus.Stderr = os.Stderr
	if err := bus.Start(); err != nil {
		return "", nil, fmt.Errorf("cannot start dbus-daemon: %w", err)
	}
	stop = func() { bus.Process.Kill(); _ = bus.Wait() }
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		stop()
		return "", nil, fmt.Errorf("dbus-daemon printed no address: %w", err)
	}
	return strings.TrimSpace(line), stop, nil
}
