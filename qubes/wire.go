// Package qubes is qcrypt's client for the Qubes OS Admin API as qubesd serves it on its
// dom0 unix socket, plus the event stream and the qrexec runner that executes scripts in
// qubes. Every byte that comes back is treated as hostile: the parsers validate tokens,
// bound sizes and never panic.
//
// The wire format (see docs/simulator.md for the sources): one request per connection, "METHOD+ARG SOURCE name DEST\0PAYLOAD",
// half-close, then "0\0BODY" (OK), "2\0TYPE\0TRACEBACK\0MESSAGE\0" (exception) or
// nothing at all (the many failures qubesd reports only in its journal).
package qubes

import (
	"bytes"
	"errors"
	"fmt"
)

// MaxRequest is qubesd's buffer size: a longer request is aborted without an answer, so
// the client refuses it before sending.
const MaxRequest = 65536

// MaxResponse bounds what the client reads for one call. qubesd answers are small
// (a few KiB even with hundreds of qubes); anything larger is treated as an attack.
const MaxResponse = 8 << 20

// Request is one Admin API call.
type Request struct {
	Method  string // e.g. "admin.vm.List"
	Arg     string // may be empty; may contain '+'
	Dest    string // qube name, "dom0" for global calls
	Payload []byte
}

// Encode renders the request exactly as the Python client does: it always writes the '+'
// after the method, the source is always dom0 and the destination type is always "name".
func (r Request) Encode() ([]byte, error) {
	if err := checkToken("method", r.Method, isMethodByte); err != nil {
		return nil, err
	}
	if r.Arg != "" {
		if err := checkToken("argument", r.Arg, isArgByte); err != nil {
			return nil, err
		}
	}
	if err := ValidateVMName(r.Dest); err != nil {
		return nil, fmt.Errorf("cannot encode %s: %w", r.Method, err)
	}
	var b bytes.Buffer
	b.Grow(len(r.Method) + len(r.Arg) + len(r.Dest) + len(r.Payload) + 16)
	b.WriteString(r.Method)
	b.WriteByte('+')
	b.WriteString(r.Arg)
	b.WriteString(" dom0 name ")
	b.WriteString(r.Dest)
	b.WriteByte(0)
	b.Write(r.Payload)
	if b.Len() > MaxRequest {
		return nil, fmt.Errorf("cannot send %s: request of %d bytes exceeds qubesd's limit of %d", r.Method, b.Len(), MaxRequest)
	}
	return b.Bytes(), nil
}

// ParseRequest splits raw request bytes the way qubesd does (used by the simulator, and
// by the conformance tests to check what the client sends). Only the first '+' separates
// method from argument; "keyword adminvm" means dom0.
func ParseRequest(raw []byte) (Request, string, error) {
	header, payload, ok := bytes.Cut(raw, []byte{0})
	if !ok {
		return Request{}, "", errors.New("framing error: no NUL after header")
	}
	fields := bytes.SplitN(header, []byte{' '}, 4)
	if len(fields) != 4 {
		return Request{}, "", errors.New("framing error: header needs 4 fields")
	}
	methArg, src, destType, dest := fields[0], string(fields[1]), string(fields[2]), string(fields[3])
	if destType == "keyword" && dest == "adminvm" {
		destType, dest = "name", "dom0"
	}
	if destType != "name" {
		return Request{}, "", fmt.Errorf("framing error: destination type %q", destType)
	}
	meth, arg, _ := bytes.Cut(methArg, []byte{'+'})
	for _, f := range [][]byte{meth, arg, []byte(src), []byte(dest)} {
		if !isASCII(f) {
			return Request{}, "", errors.New("framing error: non-ASCII header")
		}
	}
	return Request{Method: string(meth), Arg: string(arg), Dest: dest, Payload: payload}, src, nil
}

// Response status bytes.
const (
	statusOK        = '0'
	statusEvent     = '1'
	statusException = '2'
)

// ParseResponse turns one complete qubesd answer into the body (OK) or an error: *Error
// for an exception, ErrEmptyResponse when qubesd closed without a byte, and a protocol
// error for anything else.
func ParseResponse(raw []byte) ([]byte, error) {
	if len(raw) == 0 {
		return nil, ErrEmptyResponse
	}
	if len(raw) < 2 || raw[1] != 0 {
		return nil, fmt.Errorf("%w: response without status header", ErrProtocol)
	}
	switch raw[0] {
	case statusOK:
		return raw[2:], nil
	case statusException:
		return nil, parseException(raw[2:])
	case statusEvent:
		return nil, fmt.Errorf("%w: event record on a call connection", ErrProtocol)
	default:
		return nil, fmt.Errorf("%w: unknown status byte 0x%02x", ErrProtocol, raw[0])
	}
}

// parseException reads "TYPE\0TRACEBACK\0MESSAGE\0" with an optional trailing list of
// format arguments that qubesd never sends but the protocol allows.
func parseException(b []byte) error {
	parts := bytes.SplitN(b, []byte{0}, 4)
	if len(parts) < 3 {
		return fmt.Errorf("%w: truncated exception", ErrProtocol)
	}
	typ := string(parts[0])
	if !isPythonIdent(typ) {
		return fmt.Errorf("%w: bad exception type", ErrProtocol)
	}
	msg := string(parts[2])
	if len(parts) == 3 {
		// The message's terminating NUL is mandatory.
		return fmt.Errorf("%w: exception message not terminated", ErrProtocol)
	}
	return newError(typ, msg)
}

// EncodeOK builds a server's OK answer (simulator side), as EncodeException and
// EncodeEvent build the others.
func EncodeOK(body []byte) []byte {
	out := make([]byte, 0, len(body)+2)
	out = append(out, statusOK, 0)
	return append(out, body...)
}

// EncodeException renders an exception with an empty traceback, as qubesd without --debug.
func EncodeException(typ, msg string) []byte {
	out := []byte{statusException, 0}
	out = append(out, typ...)
	out = append(out, 0, 0)
	out = append(out, msg...)
	return append(out, 0)
}

func checkToken(what, s string, ok func(byte) bool) error {
	if s == "" {
		return fmt.Errorf("cannot encode request: empty %s", what)
	}
	for i := 0; i < len(s); i++ {
		if !ok(s[i]) {
			return fmt.Errorf("cannot encode request: %s %q contains byte 0x%02x", what, s, s[i])
		}
	}
	return nil
}

// isMethodByte: qrexec service names are letters, digits and "._-".
func isMethodByte(c byte) bool {
	return isAlnum(c) || c == '.' || c == '_' || c == '-'
}

// isArgByte: the qrexec argument charset (QREXEC_ALLOWED_CHARS) plus ':' which never
// appears in our args but is harmless; no space, no NUL.
func isArgByte(c byte) bool {
	return isAlnum(c) || c == '.' || c == '_' || c == '-' || c == '+'
}

func isAlnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

func isASCII(b []byte) bool {
	for _, c := range b {
		if c >= 0x80 {
			return false
		}
	}
	return true
}

func isPythonIdent(s string) bool {
	if s == "" || len(s) > 128 || s[0] >= '0' && s[0] <= '9' {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isAlnum(s[i]) && s[i] != '_' {
			return false
		}
	}
	return true
}
