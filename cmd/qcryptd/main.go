// Command qcryptd is qcrypt's dom0 daemon; see cli.Main.
package main

import (
	"os"

	"github.com/qcrypt/qcrypt/cmd/qcryptd/cli"
)

func main() {
	os.Exit(cli.Main(os.Args, os.Stdout, os.Stderr))
}
