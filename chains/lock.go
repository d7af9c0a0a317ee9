package chains

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// The cross-machine lock. A container in cloud storage (a folder a net qube syncs) can
// be opened read-write by two Qubes machines at once, and the sync then destroys it. A
// read-write open writes a lock beside the container, FILE.qcrypt-lock, in the same
// qrexec call that sets up the loop device, after checking that no other machine's lock
// is there; the close removes its own. The lock is one line:
//
//	qcrypt-lock 1 machine=<dom0's machine id> chain=<chain> time=<unix seconds>
//
// What the source qube shows of a lock is hostile input: only a line of exactly this form
// is shown to the user, anything else is "a lock qcrypt cannot read".

// ErrLocked means another machine's lock is beside the container.
var ErrLocked = errors.New("the container is locked by another machine")

const lockSuffix = ".qcrypt-lock"

var (
	machineIDRE = regexp.MustCompile(`^[0-9a-f]{32}$`)
	lockLineRE  = regexp.MustCompile(`^qcrypt-lock 1 machine=([0-9a-f]{32}) chain=([A-Za-z0-9_.@+-]{1,128}) time=([0-9]{1,12})$`)
)

// ValidMachineID reports whether id looks like /etc/machine-id's content.
func ValidMachineID(id string) bool { return machineIDRE.MatchString(id) }

// Lock is another machine's lock as the source qube showed it.
type Lock struct {
	Machine, Chain string
	Since          time.Time
	Unreadable     bool // not a lock line qcrypt wrote
}

func parseLock(line string) Lock {
	m := lockLineRE.FindStringSubmatch(line)
	if m == nil {
		return Lock{Unreadable: true}
	}
	secs, _ := strconv.ParseInt(m[3], 10, 64)
	return Lock{Machine: m[1], Chain: m[2], Since: time.Unix(secs, 0).UTC()}
}

func (l Lock) String() string {
	if l.Unreadable {
		return "a lock file qcrypt cannot read"
	}
	return fmt.Sprintf("machine %s (chain %s, since %s)", l.Machine, l.Chain, l.Since.Format("2006-01-02 15:04 UTC"))
}

// lockCheckScript is the part of the source open script before the loop device (which
// defines fail): it prints another machine's lock line as "lock:LINE" and, for a
// read-write open without breakLock, fails with exitLocked; then a read-write open
// writes its own lock.
func lockCheckScript(c *Chain, machine string, breakLock bool) string {
	if machine == "" {
		return ""
	}
	var b strings.Builder
	fmt.Fprintf(&b, "lk=\"$f\"%s\n", q(lockSuffix))
	fmt.Fprintf(&b, "if [ -e \"$lk\" ]; then\n  l1=$(head -c 300 \"$lk\" | head -n 1)\n")
	fmt.Fprintf(&b, "  case \"$l1\" in %s*) ;; *) printf 'lock:%%s\\n' \"$l1\"", q("qcrypt-lock 1 machine="+machine+" "))
	if !c.ReadOnly && !breakLock {
		fmt.Fprintf(&b, "; fail %d", exitLocked)
	}
	b.WriteString(";; esac\nfi\n")
	if !c.ReadOnly {
		fmt.Fprintf(&b, "printf 'qcrypt-lock 1 machine=%%s chain=%%s time=%%s\\n' %s %s \"$(date +%%s)\" > \"$lk.part\" && mv -f \"$lk.part\" \"$lk\" || fail %d\n",
			q(machine), q(c.Name), exitLockFailed)
	}
	return b.String()
}

// lockRemoveScript removes the lock beside the container if it is this machine's.
func lockRemoveScript(c *Chain, machine string) string {
	if machine == "" || c.ReadOnly {
		return ""
	}
	return fmt.Sprintf("lk=\"$f\"%s\nif [ -e \"$lk\" ]; then case \"$(head -c 300 \"$lk\" | head -n 1)\" in %s*) rm -f \"$lk\" || exit %d;; esac; fi\n",
		q(lockSuffix), q("qcrypt-lock 1 machine="+machine+" "), exitLockFailed)
}
