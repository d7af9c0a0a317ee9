// Command qcryptctl is qcrypt's client; see package ctl.
package main

import (
	"os"

	"github.com/qcrypt/qcrypt/ctl"
)

func main() {
	os.Exit(ctl.Main(os.Args, os.Stdout, os.Stderr))
}
