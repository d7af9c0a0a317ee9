// Package dbustest runs a private dbus-daemon with a system-bus configuration, for tests
// that talk to qcryptd over a real bus.
package dbustest

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Permissive is a bus policy that lets everyone own and call everything.
const Permissive = `<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/></policy>`

// Start runs dbus-daemon with policy (busconfig elements), its socket and configuration
// in dir. It returns the bus address and a function that stops the daemon.
func Start(dir, policy string) (addr string, stop func(), err error) {
	cfg := filepath.Join(dir, "bus.conf")
	busSock := filepath.Join(dir, "bus.sock")
	err = os.WriteFile(cfg, []byte(`<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path=`+busSock+`</listen><auth>EXTERNAL</auth>`+policy+`</busconfig>`), 0o644)
	if err != nil {
		return "", nil, fmt.Errorf("cannot write the bus configuration: %w", err)
	}
	bus := exec.Command("dbus-daemon", "--config-file="+cfg, "--nofork", "--print-address")
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
