package dbusapi

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"
)

// Descriptor ownership on qcryptd's bus connection.
//
// A message may carry descriptors its body never refers to, and godbus hands a handler
// only those the body refers to: the rest, and every descriptor of a message no handler
// takes (Peer.Ping, an unknown method, a wrong signature, a refused caller), would stay
// open in qcryptd for good. godbus has no hook for this (its transports are private), so
// qcryptd's connection is godbus over a plain stream (no descriptors) that this guard
// feeds: the guard reads each message from the bus socket itself, keeps its
// descriptors, and gives godbus the bytes. When godbus dispatches a method call (its
// incoming interceptor), the guard writes the descriptors into the call's arguments;
// when godbus answers the call (its outgoing interceptor: the handler has returned),
// the guard closes them, each exactly once. A handler that keeps a file past its return
// takes a duplicate (takeFD).
//
// Messages the guard drops, closing their descriptors: one that does not decode, one
// whose descriptor count is not what its header says, a call with descriptors that asks
// for no reply (nothing would end its ownership), and a call whose sender and serial
// repeat one still being handled.

// ConnectServer connects to the system bus (DBUS_SYSTEM_BUS_ADDRESS, else the standard
// socket) through a descriptor guard: the connection for a service that strangers can
// send messages to. It is authenticated and has its unique name.
func ConnectServer() (*dbus.Conn, error) {
	path, err := systemBusSocket()
	if err != nil {
		return nil, err
	}
	sock, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("cannot connect to the system bus: %w", err)
	}
	g := newFDGuard(sock)
	conn, err := dbus.NewConn(g, dbus.WithIncomingInterceptor(g.claim), dbus.WithOutgoingInterceptor(g.release))
	if err != nil {
		g.Close()
		return nil, fmt.Errorf("cannot connect to the system bus: %w", err)
	}
	if err := conn.Auth([]dbus.Auth{dbus.AuthExternal(strconv.Itoa(os.Geteuid()))}); err != nil {
		conn.Close()
		return nil, fmt.Errorf("cannot authenticate to the system bus: %w", err)
	}
	if err := conn.Hello(); err != nil {
		conn.Close()
		return nil, fmt.Errorf("cannot register on the system bus: %w", err)
	}
	return conn, nil
}

// systemBusSocket is the path of the system bus' Unix socket.
func systemBusSocket() (string, error) {
	addr := os.Getenv("DBUS_SYSTEM_BUS_ADDRESS")
	if addr == "" {
		return "/run/dbus/system_bus_socket", nil
	}
	for _, a := range strings.Split(addr, ";") {
		rest, ok := strings.CutPrefix(a, "unix:")
		if !ok {
			continue
		}
		for _, kv := range strings.Split(rest, ",") {
			if v, ok := strings.CutPrefix(kv, "path="); ok {
				return dbus.UnescapeBusAddressValue(v)
			}
			if v, ok := strings.CutPrefix(kv, "abstract="); ok {
				v, err := dbus.UnescapeBusAddressValue(v)
				return "@" + v, err
			}
		}
	}
	return "", fmt.Errorf("cannot use the system bus address %q: qcryptd connects over a Unix socket path only", addr)
}

// maxMessage is the largest message the D-Bus specification allows.
const maxMessage = 1 << 27

// callKey names a method call on the bus: its sender's unique name and its serial.
type callKey struct {
	sender string
	serial uint32
}

// inflight is a message given to godbus and not yet dispatched by it.
type inflight struct {
	key callKey
	fds []int
}

type fdGuard struct {
	sock *net.UnixConn

	// Read side: only godbus' reader calls Read (during authentication, Auth; then its
	// reading goroutine).
	rbuf     []byte // what is left of the message godbus is reading
	messages bool   // authentication is over: the stream is messages
	// Room for the most descriptors a bus passes with one message (dbus-broker: 253).
	ctl []byte

	mu      sync.Mutex
	queue   []inflight        // given to godbus, in order, not yet dispatched
	owned   map[callKey][]int // calls being handled: their descriptors
	pending map[callKey]bool  // keys in queue or owned, to refuse a repeated key
	closed  bool
}

func newFDGuard(sock *net.UnixConn) *fdGuard {
	return &fdGuard{sock: sock, ctl: make([]byte, unix.CmsgSpace(256*4)),
		owned: map[callKey][]int{}, pending: map[callKey]bool{}}
}

// Write passes godbus' bytes on. During authentication it asks the bus for descriptor
// passing before godbus' BEGIN (godbus over a plain stream does not ask).
func (g *fdGuard) Write(p []byte) (int, error) {
	if !g.messages && string(p) == "BEGIN\r\n" {
		if err := g.negotiateFDs(); err != nil {
			return 0, err
		}
		g.messages = true
	}
	return g.sock.Write(p)
}

func (g *fdGuard) negotiateFDs() error {
	if _, err := g.sock.Write([]byte("NEGOTIATE_UNIX_FD\r\n")); err != nil {
		return err
	}
	// Byte by byte: nothing after this line may be read before BEGIN is sent.
	var line []byte
	b := make([]byte, 1)
	for !bytes.HasSuffix(line, []byte("\r\n")) {
		if len(line) > 256 {
			return errors.New("cannot negotiate descriptor passing: the bus' answer is too long")
		}
		if _, err := io.ReadFull(g.sock, b); err != nil {
			return fmt.Errorf("cannot negotiate descriptor passing: %w", err)
		}
		line = append(line, b[0])
	}
	if !bytes.HasPrefix(line, []byte("AGREE_UNIX_FD")) {
		return fmt.Errorf("cannot negotiate descriptor passing: the bus answered %q", bytes.TrimSpace(line))
	}
	return nil
}

// Read gives godbus the bytes of the messages the guard accepted, one after the other.
func (g *fdGuard) Read(p []byte) (int, error) {
	if !g.messages {
		return g.sock.Read(p)
	}
	for len(g.rbuf) == 0 {
		raw, err := g.next()
		if err != nil {
			return 0, err
		}
		g.rbuf = raw
	}
	n := copy(p, g.rbuf)
	g.rbuf = g.rbuf[n:]
	return n, nil
}

// next reads one message with its descriptors and accepts or drops it; it returns the
// bytes of an accepted message (nil for a dropped one).
func (g *fdGuard) next() ([]byte, error) {
	raw, fds, err := g.readMessage()
	if err != nil {
		closeFDs(fds)
		return nil, err
	}
	msg, err := dbus.DecodeMessage(bytes.NewReader(raw))
	if err != nil {
		closeFDs(fds)
		return nil, nil
	}
	declared, _ := msg.Headers[dbus.FieldUnixFDs].Value().(uint32)
	if int(declared) != len(fds) {
		closeFDs(fds)
		return nil, nil
	}
	key := keyOf(msg)
	if len(fds) > 0 && (msg.Type != dbus.TypeMethodCall || msg.Flags&dbus.FlagNoReplyExpected != 0) {
		// Nothing qcryptd receives but a call takes descriptors; a call that wants no
		// reply would never end their ownership.
		closeFDs(fds)
		fds = nil
		if msg.Type == dbus.TypeMethodCall {
			return nil, nil
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		closeFDs(fds)
		return nil, net.ErrClosed
	}
	if len(fds) > 0 {
		if g.pending[key] {
			closeFDs(fds)
			return nil, nil
		}
		g.pending[key] = true
	}
	g.queue = append(g.queue, inflight{key: key, fds: fds})
	return raw, nil
}

// readMessage reads exactly one message from the socket, as godbus' own transport does:
// its fixed header, then its header fields and body, keeping every descriptor that
// came with these bytes.
func (g *fdGuard) readMessage() ([]byte, []int, error) {
	var oob []byte
	read := func(buf []byte) error {
		ctl := g.ctl
		for off := 0; off < len(buf); {
			n, oobn, flags, _, err := g.sock.ReadMsgUnix(buf[off:], ctl)
			oob = append(oob, ctl[:oobn]...)
			if err != nil {
				return err
			}
			if n == 0 {
				return io.ErrUnexpectedEOF
			}
			if flags&syscall.MSG_CTRUNC != 0 {
				return errors.New("cannot read a message: its descriptors were cut off")
			}
			off += n
		}
		return nil
	}
	head := make([]byte, 16)
	err := read(head)
	var raw []byte
	if err == nil && head[0] != 'l' && head[0] != 'B' {
		err = errors.New("cannot read a message: no byte order mark")
	}
	if err == nil {
		var order binary.ByteOrder = binary.LittleEndian
		if head[0] == 'B' {
			order = binary.BigEndian
		}
		body, fields := order.Uint32(head[4:8]), order.Uint32(head[12:16])
		fields += (8 - fields%8) % 8
		if uint64(fields)+uint64(body)+16 > maxMessage {
			err = errors.New("cannot read a message: it is too long")
		} else {
			raw = make([]byte, 16+int(fields)+int(body))
			copy(raw, head)
			err = read(raw[16:])
		}
	}
	fds, perr := parseRights(oob)
	if err == nil {
		err = perr
	}
	return raw, fds, err
}

// parseRights collects the descriptors of every SCM_RIGHTS message in oob (received
// with close-on-exec set: Go's ReadMsgUnix asks for it).
func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := syscall.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("cannot read a message's descriptors: %w", err)
	}
	var fds []int
	for i := range msgs {
		if msgs[i].Header.Level != syscall.SOL_SOCKET || msgs[i].Header.Type != syscall.SCM_RIGHTS {
			continue
		}
		got, err := syscall.ParseUnixRights(&msgs[i])
		if err != nil {
			closeFDs(fds)
			return nil, fmt.Errorf("cannot read a message's descriptors: %w", err)
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

func keyOf(msg *dbus.Message) callKey {
	sender, _ := msg.Headers[dbus.FieldSender].Value().(string)
	return callKey{sender: sender, serial: msg.Serial()}
}

// claim runs as godbus dispatches a message, in the order the guard gave them: the
// messages before it in the queue were passed over (godbus drops messages for a name it
// does not know yet) and lose their descriptors; a call's descriptors are written into
// its arguments and owned until it is answered.
func (g *fdGuard) claim(msg *dbus.Message) {
	key := keyOf(msg)
	g.mu.Lock()
	defer g.mu.Unlock()
	for len(g.queue) > 0 {
		e := g.queue[0]
		g.queue = g.queue[1:]
		if e.key != key {
			if len(e.fds) > 0 {
				closeFDs(e.fds)
				delete(g.pending, e.key)
			}
			continue
		}
		if len(e.fds) > 0 {
			g.owned[key] = e.fds
			for i, v := range msg.Body {
				msg.Body[i] = withFDs(v, e.fds)
			}
		}
		return
	}
}

// release runs as godbus sends a message: an answer to a call ends the ownership of the
// call's descriptors (its handler has returned).
func (g *fdGuard) release(msg *dbus.Message) {
	if msg.Type != dbus.TypeMethodReply && msg.Type != dbus.TypeError {
		return
	}
	dest, _ := msg.Headers[dbus.FieldDestination].Value().(string)
	serial, _ := msg.Headers[dbus.FieldReplySerial].Value().(uint32)
	key := callKey{sender: dest, serial: serial}
	g.mu.Lock()
	fds, ok := g.owned[key]
	delete(g.owned, key)
	delete(g.pending, key)
	g.mu.Unlock()
	if ok {
		closeFDs(fds)
	}
}

// Close closes the socket and the descriptors of messages godbus will not dispatch
// now; those of calls being handled are closed when they are answered.
func (g *fdGuard) Close() error {
	g.mu.Lock()
	g.closed = true
	for _, e := range g.queue {
		closeFDs(e.fds)
		delete(g.pending, e.key)
	}
	g.queue = nil
	g.mu.Unlock()
	return g.sock.Close()
}

// withFDs puts descriptors where a decoded value holds their indices: as an argument,
// in a variant, a struct, an array or a dictionary's values. An index past the message's
// descriptors stays an index, which no handler takes for a descriptor.
func withFDs(v any, fds []int) any {
	switch x := v.(type) {
	case dbus.UnixFDIndex:
		if int(x) < len(fds) {
			return dbus.UnixFD(fds[x])
		}
		return x
	case []dbus.UnixFDIndex:
		out := make([]dbus.UnixFD, len(x))
		for i, e := range x {
			if int(e) >= len(fds) {
				return x
			}
			out[i] = dbus.UnixFD(fds[e])
		}
		return out
	case dbus.Variant:
		return dbus.MakeVariantWithSignature(withFDs(x.Value(), fds), x.Signature())
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = withFDs(e, fds)
		}
		return out
	case []dbus.Variant:
		out := make([]dbus.Variant, len(x))
		for i, e := range x {
			out[i] = withFDs(e, fds).(dbus.Variant)
		}
		return out
	case map[string]dbus.Variant:
		out := make(map[string]dbus.Variant, len(x))
		for k, e := range x {
			out[k] = withFDs(e, fds).(dbus.Variant)
		}
		return out
	case map[string]dbus.UnixFDIndex:
		out := make(map[string]dbus.UnixFD, len(x))
		for k, e := range x {
			if int(e) >= len(fds) {
				return x
			}
			out[k] = dbus.UnixFD(fds[e])
		}
		return out
	}
	return v
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

var _ io.ReadWriteCloser = (*fdGuard)(nil)
