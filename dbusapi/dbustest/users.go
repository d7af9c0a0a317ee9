package dbustest

import (
	"fmt"
	"os/exec"
	"os/user"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// The attackers of docs/security.md, as real local users: QUser is in group qubes (may
// use qcryptd), QSec is in no group (may only introspect).
const (
	QUser = "qcrypt-quser"
	QSec  = "qcrypt-qsec"
	Group = "qubes"
)

var usersMu sync.Mutex

// User returns the credentials of a local user, creating it (and group qubes) first
// when needed; it needs root. The credentials carry the user's groups, so a process
// started with them shows the bus exactly what such a user's login would.
func User(name string) (*syscall.Credential, error) {
	usersMu.Lock()
	defer usersMu.Unlock()
	if _, err := user.LookupGroup(Group); err != nil {
		if err := retry("groupadd", "--system", Group); err != nil {
			return nil, err
		}
	}
	if _, err := user.Lookup(name); err != nil {
		args := []string{"--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group"}
		if name == QUser {
			args = append(args, "--groups", Group)
		}
		if err := retry("useradd", append(args, name)...); err != nil {
			return nil, err
		}
	}
	u, err := user.Lookup(name)
	if err != nil {
		return nil, err
	}
	gids, err := u.GroupIds()
	if err != nil {
		return nil, err
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	cred := &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	for _, g := range gids {
		n, _ := strconv.ParseUint(g, 10, 32)
		cred.Groups = append(cred.Groups, uint32(n))
	}
	return cred, nil
}

// retry runs a shadow tool, which fails while another process (a test of another
// package) holds the lock of /etc/passwd or /etc/group.
func retry(tool string, args ...string) error {
	var out []byte
	var err error
	for i := 0; i < 50; i++ {
		if out, err = exec.Command(tool, args...).CombinedOutput(); err == nil {
			return nil
		}
		if _, lookErr := user.Lookup(args[len(args)-1]); lookErr == nil {
			return nil // created meanwhile by another test process
		}
		if _, lookErr := user.LookupGroup(args[len(args)-1]); lookErr == nil {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s %v: %w: %s", tool, args, err, out)
}
