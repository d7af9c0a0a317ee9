// sigprobe is test equipment: it subscribes to every broadcast signal on the system
// bus, prints READY, then one line per signal (sender, path, member) until qcryptd
// leaves the bus. Run as a given user, it shows which signals the bus policy lets that
// user receive.
package main

import (
	"fmt"
	"os"

	"github.com/godbus/dbus/v5"
)

func main() {
	conn, err := dbus.ConnectSystemBus()
	if err != nil {
		fmt.Fprintln(os.Stderr, "sigprobe:", err)
		os.Exit(1)
	}
	if err := conn.AddMatchSignal(); err != nil {
		fmt.Fprintln(os.Stderr, "sigprobe:", err)
		os.Exit(1)
	}
	sigs := make(chan *dbus.Signal, 1024)
	conn.Signal(sigs)
	fmt.Println("READY")
	for s := range sigs {
		fmt.Println(s.Sender, s.Path, s.Name)
		if s.Name == "org.freedesktop.DBus.NameOwnerChanged" && len(s.Body) == 3 && s.Body[0] == "org.qcrypt.Qcryptd1" && s.Body[2] == "" {
			fmt.Println("LEFT")
			return
		}
	}
}
