// Command qcryptd is qcrypt's dom0 daemon; see daemon.Main.
package main

import (
	"os"

	"github.com/qcrypt/qcrypt/daemon"
)

func main() {
	os.Exit(daemon.Main(os.Args, os.Stdout, os.Stderr))
}
