package systemd

import (
	"context"
	"fmt"
	"os"
	"strconv"

	"github.com/godbus/dbus/v5"
)

// privateSocket is PID 1's own D-Bus socket (root only, no bus in between).
const privateSocket = "/run/systemd/private"

// SystemStopping reports whether the system is shutting down (PID 1's SystemState is
// "stopping"), as against a stop or restart of qcryptd alone. Outside systemd it is
// false.
func SystemStopping(ctx context.Context) (bool, error) {
	if os.Getenv("INVOCATION_ID") == "" {
		return false, nil // not started by systemd
	}
	conn, err := dbus.Dial("unix:path="+privateSocket, dbus.WithContext(ctx))
	if err != nil {
		return false, fmt.Errorf("cannot ask systemd whether the system stops: %w", err)
	}
	defer conn.Close()
	if err := conn.Auth([]dbus.Auth{dbus.AuthExternal(strconv.Itoa(os.Geteuid()))}); err != nil {
		return false, fmt.Errorf("cannot ask systemd whether the system stops: %w", err)
	}
	v, err := conn.Object("org.freedesktop.systemd1", "/org/freedesktop/systemd1").
		GetProperty("org.freedesktop.systemd1.Manager.SystemState")
	if err != nil {
		return false, fmt.Errorf("cannot ask systemd whether the system stops: %w", err)
	}
	state, _ := v.Value().(string)
	return state == "stopping", nil
}
