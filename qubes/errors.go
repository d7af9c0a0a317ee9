package qubes

import (
	"errors"
	"fmt"
	"strings"
)

var (
	// ErrEmptyResponse is qubesd closing the connection without a byte: the call failed
	// and the reason is only in qubesd's journal (ProtocolError, PermissionDenied and
	// every non-Qubes exception on R4.1–R4.3). Never a success.
	ErrEmptyResponse = errors.New("qubesd sent an empty response (call refused or failed, see journalctl -u qubesd)")
	// ErrProtocol is an answer that does not follow the wire format.
	ErrProtocol = errors.New("qubesd protocol violation")
)

// Error kinds, for errors.Is on an *Error. One exception type maps to one kind.
var (
	ErrNoSuchVM        = errors.New("no such qube")
	ErrNotRunning      = errors.New("qube not running")
	ErrNotPaused       = errors.New("qube not paused")
	ErrNotHalted       = errors.New("qube not halted")
	ErrAlreadyAttached = errors.New("device already attached")
	ErrNotAttached     = errors.New("device not attached")
	ErrNoSuchProperty  = errors.New("no such property")
	ErrInvalidValue    = errors.New("invalid value")
	ErrRefused         = errors.New("request refused")
	ErrTimedOut        = errors.New("qubesd timed out")
	ErrQubes           = errors.New("qubes error")
)

var exceptionKinds = map[string]error{
	"QubesVMNotFoundError":        ErrNoSuchVM,
	"QubesVMNotStartedError":      ErrNotRunning,
	"QubesVMNotRunningError":      ErrNotRunning,
	"QubesVMNotPausedError":       ErrNotPaused,
	"QubesVMNotHaltedError":       ErrNotHalted,
	"DeviceAlreadyAttached":       ErrAlreadyAttached,
	"DeviceAlreadyAssigned":       ErrAlreadyAttached,
	"DeviceNotAttached":           ErrNotAttached,
	"DeviceNotAssigned":           ErrNotAttached,
	"DeviceNotFound":              ErrNotAttached,
	"QubesNoSuchPropertyError":    ErrNoSuchProperty,
	"QubesValueError":             ErrInvalidValue,
	"QubesPropertyValueError":     ErrInvalidValue,
	"ProtocolError":               ErrRefused,
	"PermissionDenied":            ErrRefused,
	"QubesVMShutdownTimeoutError": ErrTimedOut,
}

// keyErrorTypes derive from Python's KeyError without overriding __str__, so their
// message arrives wrapped in single quotes.
var keyErrorTypes = map[string]bool{
	"DeviceNotAttached":     true,
	"DeviceAlreadyAttached": true,
	"DeviceNotAssigned":     true,
	"DeviceAlreadyAssigned": true,
	"DeviceNotFound":        true,
}

// Error is an exception qubesd reported. Message is printable text (quotes of
// KeyError-style types removed, control bytes replaced) and safe to log.
type Error struct {
	Type    string
	Message string
	kind    error
}

func newError(typ, msg string) *Error {
	if keyErrorTypes[typ] && len(msg) >= 2 && msg[0] == '\'' && msg[len(msg)-1] == '\'' {
		msg = msg[1 : len(msg)-1]
	}
	kind, ok := exceptionKinds[typ]
	if !ok {
		kind = ErrQubes
	}
	return &Error{Type: typ, Message: Printable(msg, 512), kind: kind}
}

func (e *Error) Error() string {
	if e.Message == "" {
		return "qubesd: " + e.Type
	}
	return fmt.Sprintf("qubesd: %s: %s", e.Type, e.Message)
}

// Is reports whether target is this error's kind.
func (e *Error) Is(target error) bool { return target == e.kind }

// Printable makes untrusted text safe to show or log on one line: bytes outside
// printable ASCII become '?', and the result is cut to limit bytes with a marker.
func Printable(s string, limit int) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if b.Len() >= limit {
			b.WriteString("...")
			break
		}
		c := s[i]
		if c < 0x20 || c >= 0x7f {
			c = '?'
		}
		b.WriteByte(c)
	}
	return b.String()
}
