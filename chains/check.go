package chains

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// DefaultConfigRoot holds one directory per config target.
const DefaultConfigRoot = "/etc/qcryptd"

// TargetDir resolves a TARGET (a name under root) or a DIR (a value containing '/').
func TargetDir(arg, root string) (string, error) {
	if arg == "" {
		arg = "default"
	}
	if strings.Contains(arg, "/") {
		return arg, nil
	}
	if arg == "." || arg == ".." || strings.ContainsAny(arg, "\x00") {
		return "", fmt.Errorf("invalid config target %q", arg)
	}
	return filepath.Join(root, arg), nil
}

// Check validates a target offline, as `qcryptd check`: "All good." and 0, or every
// error and 1.
func Check(out io.Writer, arg, root string) int {
	dir, err := TargetDir(arg, root)
	if err != nil {
		fmt.Fprintln(out, "ERROR:", err)
		return 1
	}
	chains, err := LoadTarget(dir, os.Geteuid() == 0)
	var cerrs ConfigErrors
	switch {
	case errors.As(err, &cerrs):
		for _, e := range cerrs {
			fmt.Fprintln(out, "ERROR:", e.Error())
		}
		fmt.Fprintf(out, "%d error(s) in %s.\n", len(cerrs), dir)
		return 1
	case err != nil:
		fmt.Fprintln(out, "ERROR:", err)
		return 1
	case len(chains) == 0:
		fmt.Fprintf(out, "ERROR: %s has no chain files (*.ini).\n", dir)
		return 1
	}
	fmt.Fprintln(out, "All good.")
	return 0
}
