package inqube

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"

	"github.com/qcrypt/qcrypt/qubessim/kernelcall"
)

// The sandbox's /dev is a private tmpfs. So that scripts can test for devices and
// resolve /dev/mapper links as on a real system, it holds an empty file per block device
// of the qube and the links /dev/mapper/NAME, /dev/disk/by-uuid/U and /dev/disk/by-label/L.
// They are synced when a sandbox starts and after every fake tool call.

var (
	ownedNodeRE = regexp.MustCompile(`^(loop[0-9]+|dm-[0-9]+|xvd[a-z]+|sd[a-z]+[0-9]*)$`)
	safeLinkRE  = regexp.MustCompile(`^[A-Za-z0-9_.+-]{1,127}$`)
)

// SafeLinkName says whether a UUID, label or mapping name may name a link under /dev:
// they come from the qube's own data.
func SafeLinkName(s string) bool { return safeLinkRE.MatchString(s) }

// link makes a /dev link; when two devices claim one name (two file systems with one
// label) the first keeps it, as udev keeps one.
func link(target, name string) error {
	if err := os.Symlink(target, name); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	return nil
}

// syncDevNodes makes root+"/dev" match nodes (root is "" inside a sandbox).
func syncDevNodes(root string, nodes []kernelcall.DevNode) error {
	var errs []error
	dev := filepath.Join(root, "/dev")
	want := map[string]bool{}
	for _, n := range nodes {
		want[n.Name] = true
	}
	ents, _ := os.ReadDir(dev)
	for _, e := range ents {
		if ownedNodeRE.MatchString(e.Name()) && !want[e.Name()] {
			os.Remove(filepath.Join(dev, e.Name()))
		}
	}
	for _, d := range []string{"mapper", "disk/by-uuid", "disk/by-label"} {
		os.RemoveAll(filepath.Join(dev, d))
		errs = append(errs, os.MkdirAll(filepath.Join(dev, d), 0o755))
	}
	for _, n := range nodes {
		p := filepath.Join(dev, n.Name)
		if f, err := os.OpenFile(p, os.O_CREATE|os.O_RDONLY, 0o600); err == nil {
			f.Close()
		}
		if n.Mapper != "" && SafeLinkName(n.Mapper) {
			errs = append(errs, link("../"+n.Name, filepath.Join(dev, "mapper", n.Mapper)))
		}
		if n.UUID != "" && SafeLinkName(n.UUID) {
			errs = append(errs, link("../../"+n.Name, filepath.Join(dev, "disk/by-uuid", n.UUID)))
		}
		if n.Label != "" && SafeLinkName(n.Label) {
			errs = append(errs, link("../../"+n.Name, filepath.Join(dev, "disk/by-label", n.Label)))
		}
	}
	return errors.Join(errs...)
}

// SandboxInit runs first in every sandbox: it fills /dev, then becomes the command.
func SandboxInit(argv []string) int {
	if len(argv) > 0 && argv[0] == "--" {
		argv = argv[1:]
	}
	if len(argv) == 0 {
		return 2
	}
	if resp, err := kernelcall.Call(kernelcall.Request{Op: kernelcall.Devices}); err == nil {
		if err := syncDevNodes("", resp.Devices); err != nil {
			fmt.Fprintf(os.Stderr, "qubes-sim: cannot fill /dev: %v\n", err)
		}
	}
	err := syscall.Exec(argv[0], argv, os.Environ())
	fmt.Fprintf(os.Stderr, "qubes-sim: cannot run %s: %v\n", strings.Join(argv, " "), err)
	return 127
}
