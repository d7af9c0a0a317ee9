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
//
// A received descriptor belongs to the bus connection (fdguard.go), which closes it
// when the call is answered: a handler reads it while it runs, or keeps a duplicate.

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

// fileID is a file's identity, to refuse one file passed under two descriptors.
type fileID struct{ dev, ino uint64 }

// receivedFiles takes a call's descriptors: each is checked for its kind and
// duplicated, and one regular file is taken once only.
type receivedFiles struct {
	seen map[fileID]string
}

// take checks a received descriptor and returns a duplicate the caller owns.
func (r *receivedFiles) take(fd dbus.UnixFD, kind fdKind, what string) (*os.File, error) {
	fail := func(format string, a ...any) (*os.File, error) {
		return nil, Errorf(InvalidArgs, "%s: %s", what, fmt.Sprintf(format, a...))
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
	// A regular file under two descriptors would be written twice (two backups, a backup
	// and the work file) or read as something else; a device (entropy) may be read twice.
	if regular {
		id := fileID{dev: st.Dev, ino: st.Ino}
		if r.seen == nil {
			r.seen = map[fileID]string{}
		}
		if other, ok := r.seen[id]; ok {
			return fail("the same file is passed as %s", other)
		}
		r.seen[id] = what
	}
	dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return fail("cannot duplicate it: %v", err)
	}
	if kind == fdRead {
		// Non-blocking, the runtime polls it where it can (a terminal, a device), so a
		// canceled job's read deadline ends a read that would block for good.
		if err := unix.SetNonblock(dup, true); err != nil {
			unix.Close(dup)
			return fail("cannot make it non-blocking: %v", err)
		}
	}
	return os.NewFile(uintptr(dup), what), nil
}

// readKey reads a key passed for injection.
func (r *receivedFiles) readKey(fd dbus.UnixFD, vm string) ([]byte, error) {
	f, err := r.take(fd, fdKeyFile, "inject key for "+vm)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	// From its start, whatever the offset the caller shares with us.
	key, err := io.ReadAll(io.NewSectionReader(f, 0, maxInjectedKey+1))
	if err != nil || len(key) == 0 || len(key) > maxInjectedKey {
		clear(key)
		return nil, Errorf(InvalidArgs, "inject key for %s: cannot read 1 byte to 64 KiB", vm)
	}
	return key, nil
}
