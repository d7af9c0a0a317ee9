// Command qubes-sim is a Qubes OS qubesd simulator for qcrypt's tests and demo: it serves
// the Admin API, runs commands in sandboxed qubes through a qrexec-client compatible
// entry point, and, invoked as losetup, cryptsetup, mount, ..., is the fake block tools
// inside those qubes.
package main

import (
	"os"

	"github.com/qcrypt/qcrypt/qubessim"
)

func main() {
	os.Exit(qubessim.Main(os.Args, os.Stdout, os.Stderr))
}
