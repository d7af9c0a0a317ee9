package qubes

import (
	"fmt"
	"regexp"
	"strings"
)

// vmNameRE is qubesd's validate_name pattern (qubes/vm/__init__.py).
var vmNameRE = regexp.MustCompile(`^[a-zA-Z][a-zA-Z0-9_-]*$`)

// portRE is the block device ident qubesd accepts from a backend's QubesDB
// (qubes/ext/block.py: `\A[a-z0-9-]{1,12}\Z`); the same ident is the R4.3 port_id.
var portRE = regexp.MustCompile(`^[a-z0-9-]{1,12}$`)

// ValidateVMName accepts exactly the names qubesd accepts for a qube.
func ValidateVMName(name string) error {
	switch {
	case name == "":
		return fmt.Errorf("invalid qube name: empty")
	case len(name) > 31:
		return fmt.Errorf("invalid qube name %q: longer than 31 characters", Printable(name, 40))
	case !vmNameRE.MatchString(name):
		return fmt.Errorf("invalid qube name %q: only letters, digits, '_' and '-', starting with a letter", Printable(name, 40))
	case name == "none" || name == "default" || name == "Domain-0":
		return fmt.Errorf("invalid qube name %q: reserved", name)
	case strings.HasSuffix(name, "-dm"):
		return fmt.Errorf("invalid qube name %q: must not end with -dm", name)
	}
	return nil
}

// ValidatePort accepts a block device ident / port id (e.g. "loop0", "dm-3", "sda1").
func ValidatePort(port string) error {
	if !portRE.MatchString(port) {
		return fmt.Errorf("invalid block device port %q", Printable(port, 40))
	}
	return nil
}

// ClassAdminVM is dom0's class; dom0 is never a member of a chain.
const ClassAdminVM = "AdminVM"

// ValidateMemberName accepts a qube name that may be part of a chain: a valid name
// other than dom0 (the AdminVM, which the engine also refuses by class).
func ValidateMemberName(name string) error {
	if err := ValidateVMName(name); err != nil {
		return err
	}
	if name == "dom0" {
		return fmt.Errorf("dom0 is never part of a chain: it must not serve, decrypt or receive a device")
	}
	return nil
}
