// Package dbusapi is qcryptd's whole D-Bus surface: names, the introspection data, the
// server side that checks callers and hands requests to the daemon, and the typed
// client qcryptctl uses.
package dbusapi

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/coreos/go-systemd/v22/dbus"
	godbus "github.com/godbus/dbus/v5"
)

// Fixed names.
const (
	BusName          = "org.qcrypt.Qcryptd1"
	ManagerPath      = godbus.ObjectPath("/org/qcrypt/Qcryptd1")
	ManagerInterface = "org.qcrypt.Qcryptd1.Manager"
	ChainInterface   = "org.qcrypt.Qcryptd1.Chain"
	JobInterface     = "org.qcrypt.Qcryptd1.Job"
	ErrorPrefix      = "org.qcrypt.Qcryptd1.Error."
	chainPathPrefix  = "/org/qcrypt/Qcryptd1/chain/"
	jobPathPrefix    = "/org/qcrypt/Qcryptd1/job/"

	objectManagerInterface  = "org.freedesktop.DBus.ObjectManager"
	propertiesInterface     = "org.freedesktop.DBus.Properties"
	introspectableInterface = "org.freedesktop.DBus.Introspectable"
)

// ChainPath is the object of a chain; names are escaped as systemd does (_xx).
func ChainPath(name string) godbus.ObjectPath {
	return godbus.ObjectPath(chainPathPrefix + dbus.PathBusEscape(name))
}

// JobPath is the object of job n.
func JobPath(n uint64) godbus.ObjectPath {
	return godbus.ObjectPath(fmt.Sprintf("%s%d", jobPathPrefix, n))
}

// JobID is the number of a job object; false for a path that is not one.
func JobID(p godbus.ObjectPath) (uint64, bool) {
	rest, ok := strings.CutPrefix(string(p), jobPathPrefix)
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(rest, 10, 64)
	return n, err == nil
}

// ErrorName is the last part of a qcryptd D-Bus error's name
// (org.qcrypt.Qcryptd1.Error.<ErrorName>).
type ErrorName string

// The error names.
const (
	NoSuchChain   ErrorName = "NoSuchChain"
	NoSuchJob     ErrorName = "NoSuchJob"
	InvalidArgs   ErrorName = "InvalidArgs"
	InvalidConfig ErrorName = "InvalidConfig"
	ShuttingDown  ErrorName = "ShuttingDown"
	Failed        ErrorName = "Failed"
)

const accessDenied = "org.freedesktop.DBus.Error.AccessDenied"

// Error is a failure the backend reports under one of the names above.
type Error struct {
	Name ErrorName
	Msg  string
}

func (e *Error) Error() string { return e.Msg }

// Errorf makes an *Error.
func Errorf(name ErrorName, format string, a ...any) error {
	return &Error{Name: name, Msg: fmt.Sprintf(format, a...)}
}

// ErrAccessDenied is returned to callers that are neither root nor in group qubes.
var ErrAccessDenied = errors.New("access denied: only root and members of group qubes may call qcryptd")

// maxErrorMessage bounds an error reply's text. Errors quote a caller's values
// shortened (chains.Quote); this catches any that does not.
const maxErrorMessage = 4096

// toDBus maps an error to the reply a client sees.
func toDBus(err error) *godbus.Error {
	if err == nil {
		return nil
	}
	name, msg := ErrorPrefix+string(Failed), err.Error()
	var e *Error
	switch {
	case errors.Is(err, ErrAccessDenied):
		name = accessDenied
	case errors.As(err, &e):
		name, msg = ErrorPrefix+string(e.Name), e.Msg
	}
	if len(msg) > maxErrorMessage {
		msg = strings.ToValidUTF8(msg[:maxErrorMessage], "") + fmt.Sprintf("... (%d bytes cut)", len(msg)-maxErrorMessage)
	}
	return godbus.NewError(name, []any{msg})
}

// PasswordQuestionID is the Id= of the password question a job puts to systemd's
// password agents: qcryptctl answers the question of its own job only.
func PasswordQuestionID(job uint64) string { return fmt.Sprintf("qcrypt:job:%d", job) }
