// Command qcryptd is qcrypt's dom0 daemon. `qcryptd check [TARGET|DIR]` validates a
// configuration target offline.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/qcrypt/qcrypt/chains"
)

func main() {
	fs := flag.NewFlagSet("qcryptd", flag.ExitOnError)
	root := fs.String("config-root", chains.DefaultConfigRoot, "directory holding one directory per config target")
	fs.Parse(os.Args[1:])
	args := fs.Args()
	if len(args) >= 1 && args[0] == "check" {
		if len(args) > 2 {
			fmt.Fprintln(os.Stderr, "usage: qcryptd [--config-root DIR] check [TARGET|DIR]")
			os.Exit(2)
		}
		target := ""
		if len(args) == 2 {
			target = args[1]
		}
		os.Exit(chains.Check(os.Stdout, target, *root))
	}
	fmt.Fprintln(os.Stderr, "usage: qcryptd [--config-root DIR] check [TARGET|DIR]")
	os.Exit(2)
}
