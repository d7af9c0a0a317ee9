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
		return "", fmt.Errorf("invalid config target %s", Quote(arg))
	}
	return filepath.Join(root, arg), nil
}

// CheckTarget validates a target (asRoot: with root's ownership rules) and returns
// every problem; none means it is good. qcryptd check, the daemon's Check and
// qcryptctl's local check all use it.
func CheckTarget(arg, root string, asRoot bool) []string {
	dir, err := TargetDir(arg, root)
	if err != nil {
		return []string{err.Error()}
	}
	chains, err := LoadTarget(dir, asRoot)
	var cerrs ConfigErrors
	switch {
	case errors.As(err, &cerrs):
		out := make([]string, len(cerrs))
		for i, e := range cerrs {
			out[i] = e.Error()
		}
		return out
	case err != nil:
		return []string{err.Error()}
	case len(chains) == 0:
		return []string{fmt.Sprintf("%s has no chain files (*.ini)", dir)}
	}
	var out []string
	for _, c := range chains {
		for i, h := range c.Hops {
			if store, isStore, _ := ParseKeystoreRef(h.Inject); isStore {
				if msg := checkKeystore(Keystore{Dir: store}, asRoot); msg != "" {
					out = append(out, fmt.Sprintf("%s: destination inj %d: %s", c.File, i+1, msg))
				}
			}
		}
	}
	return out
}

// checkKeystore says what is wrong with a key store a chain names: it must exist and,
// for root, be root's alone (qcryptd opens it and reads keys from it).
func checkKeystore(k Keystore, asRoot bool) string {
	st, err := os.Lstat(k.Container())
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Sprintf("no key store in %s (%s is missing)", k.Dir, filepath.Base(k.Container()))
	case err != nil:
		return fmt.Sprintf("cannot check the key store: %v", err)
	case !st.Mode().IsRegular():
		return fmt.Sprintf("key store %s is not a regular file", k.Container())
	}
	if asRoot {
		if msg := unsafeForRoot(st, false); msg != "" {
			return fmt.Sprintf("cannot trust key store %s: %s", k.Container(), msg)
		}
	}
	return ""
}

// Check validates a target offline, as `qcryptd check`: "All good." and 0, or every
// error and 1.
func Check(out io.Writer, arg, root string) int {
	errs := CheckTarget(arg, root, os.Geteuid() == 0)
	for _, e := range errs {
		fmt.Fprintln(out, "ERROR:", e)
	}
	if len(errs) > 0 {
		if dir, err := TargetDir(arg, root); err == nil {
			fmt.Fprintf(out, "%d error(s) in %s.\n", len(errs), dir)
		}
		return 1
	}
	fmt.Fprintln(out, "All good.")
	return 0
}
