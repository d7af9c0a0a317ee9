package dbusapi

import (
	"fmt"
	"io"
	"os"

	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"
)

// Files from callers. qcryptd never opens a dom0 path a caller named: qcryptctl opens
// it with the caller's own rights and passes the descriptor (type h, udisks'
// convention), so what qcryptd can do with it is what the caller could.

// maxInjectedKey bounds a key passed for injection.
const maxInjectedKey = 64 << 10

// fdKind is what a passed descriptor must be.
type fdKind int

const (
	fdRead      fdKind = iota // entropy: a regular file or a character device, readable
	fdKeyFile                 // a key to inject: a regular file of 1 byte to 64 KiB, readable
	fdNewFile                 // a key backup: an empty regular file, writable
	fdContainer               // a work file for the container: an empty regular file, readable and writable
)

// checkFD wraps a received descriptor after checking it is of the kind wanted; the
// descriptor is closed when it is not.
func checkFD(fd dbus.UnixFD, kind fdKind, what string) (*os.File, error) {
	if kind == fdRead {
		// Non-blocking, the runtime polls it where it can (a terminal, a device), so a
		// canceled job's read deadline ends a read that would block for good.
		if err := unix.SetNonblock(int(fd), true); err != nil {
			unix.Close(int(fd))
			return nil, Errorf(ReasonInvalidArgs, "%s: cannot make it non-blocking: %v", what, err)
		}
	}
	f := os.NewFile(uintptr(fd), what)
	if f == nil {
		return nil, Errorf(ReasonInvalidArgs, "%s: not a file descriptor", what)
	}
	fail := func(format string, a ...any) (*os.File, error) {
		f.Close()
		return nil, Errorf(ReasonInvalidArgs, "%s: %s", what, fmt.Sprintf(format, a...))
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(fd), &st); err != nil {
		return fail("cannot stat: %v", err)
	}
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return fail("cannot read its flags: %v", err)
	}
	acc := flags & unix.O_ACCMODE
	readable, writable := acc == unix.O_RDONLY || acc == unix.O_RDWR, acc == unix.O_WRONLY || acc == unix.O_RDWR
	regular, char := st.Mode&unix.S_IFMT == unix.S_IFREG, st.Mode&unix.S_IFMT == unix.S_IFCHR
	switch kind {
	case fdRead:
		if !regular && !char || !readable {
			return fail("must be a readable file or character device")
		}
	case fdKeyFile:
		if !regular || !readable || st.Size < 1 || st.Size > maxInjectedKey {
			return fail("must be a readable regular file of 1 byte to 64 KiB")
		}
	case fdNewFile:
		if !regular || !writable || st.Size != 0 {
			return fail("must be a new, empty regular file opened for writing")
		}
	case fdContainer:
		if !regular || acc != unix.O_RDWR || st.Size != 0 {
			return fail("must be a new, empty regular file opened for reading and writing")
		}
	}
	return f, nil
}

// readKey reads and closes a key passed for injection.
func readKey(fd dbus.UnixFD, vm string) ([]byte, error) {
	f, err := checkFD(fd, fdKeyFile, "inject key for "+vm)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	key, err := io.ReadAll(io.LimitReader(f, maxInjectedKey+1))
	if err != nil || len(key) == 0 || len(key) > maxInjectedKey {
		return nil, Errorf(ReasonInvalidArgs, "inject key for %s: cannot read 1 byte to 64 KiB", vm)
	}
	return key, nil
}

// CloseFDs closes the descriptors in a message's arguments, except those taken, each
// once (a caller may send them anywhere, and one twice; left open they would fill
// qcryptd's table).
func CloseFDs(taken map[dbus.UnixFD]bool, vs ...any) {
	if taken == nil {
		taken = map[dbus.UnixFD]bool{}
	}
	for _, v := range vs {
		switch x := v.(type) {
		case dbus.UnixFD:
			if !taken[x] {
				unix.Close(int(x))
				taken[x] = true
			}
		case dbus.Variant:
			CloseFDs(taken, x.Value())
		case map[string]dbus.Variant:
			for _, e := range x {
				CloseFDs(taken, e)
			}
		case []any:
			CloseFDs(taken, x...)
		}
	}
}
