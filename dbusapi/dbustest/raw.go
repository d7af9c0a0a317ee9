package dbustest

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/godbus/dbus/v5"
)

// Raw is an attacker's bus client: it sends messages exactly as given, with any
// descriptors attached, whether the body refers to them or not (godbus attaches only
// those its body holds). It reads what comes back itself.
type Raw struct {
	conn   *net.UnixConn
	in     *bufio.Reader
	serial uint32
	Name   string // its unique name
}

// DialRaw connects to the bus at a unix:path= address, authenticates as this process'
// user with descriptor passing on, and says Hello.
func DialRaw(addr string) (*Raw, error) {
	path, ok := strings.CutPrefix(addr, "unix:path=")
	if !ok {
		return nil, fmt.Errorf("raw client: not a unix:path= address: %s", addr)
	}
	if i := strings.IndexByte(path, ','); i >= 0 {
		path = path[:i]
	}
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	r := &Raw{conn: c, in: bufio.NewReader(c)}
	uid := fmt.Sprintf("%x", strconv.Itoa(os.Geteuid()))
	for _, step := range []struct{ send, want string }{
		{"\x00AUTH EXTERNAL " + uid + "\r\n", "OK "},
		{"NEGOTIATE_UNIX_FD\r\n", "AGREE_UNIX_FD"},
	} {
		if _, err := c.Write([]byte(step.send)); err != nil {
			c.Close()
			return nil, err
		}
		line, err := r.in.ReadString('\n')
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("raw client: authentication: %w", err)
		}
		if !strings.HasPrefix(line, step.want) {
			c.Close()
			return nil, fmt.Errorf("raw client: authentication: got %q", line)
		}
	}
	if _, err := c.Write([]byte("BEGIN\r\n")); err != nil {
		c.Close()
		return nil, err
	}
	serial, err := r.Send(Call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello"), nil)
	if err != nil {
		c.Close()
		return nil, err
	}
	reply, err := r.Reply(serial, time.Minute)
	if err != nil {
		c.Close()
		return nil, err
	}
	if len(reply.Body) != 1 {
		c.Close()
		return nil, fmt.Errorf("raw client: Hello answered %v", reply.Body)
	}
	r.Name, _ = reply.Body[0].(string)
	return r, nil
}

// Call makes a method call message; body values of type dbus.UnixFDIndex are sent as
// the descriptor indices they are.
func Call(dest string, path dbus.ObjectPath, iface, member string, body ...any) *dbus.Message {
	m := &dbus.Message{Type: dbus.TypeMethodCall, Headers: map[dbus.HeaderField]dbus.Variant{
		dbus.FieldDestination: dbus.MakeVariant(dest),
		dbus.FieldPath:        dbus.MakeVariant(path),
		dbus.FieldMember:      dbus.MakeVariant(member),
	}, Body: body}
	if iface != "" {
		m.Headers[dbus.FieldInterface] = dbus.MakeVariant(iface)
	}
	if len(body) > 0 {
		m.Headers[dbus.FieldSignature] = dbus.MakeVariant(dbus.SignatureOf(body...))
	}
	return m
}

// Send sends msg with fds attached (its UNIX_FDS header says how many) and returns
// its serial.
func (r *Raw) Send(msg *dbus.Message, fds []int) (uint32, error) {
	if len(fds) > 0 {
		msg.Headers[dbus.FieldUnixFDs] = dbus.MakeVariant(uint32(len(fds)))
	}
	var buf bytes.Buffer
	if err := msg.EncodeTo(&buf, binary.LittleEndian); err != nil {
		return 0, err
	}
	r.serial++
	b := buf.Bytes()
	binary.LittleEndian.PutUint32(b[8:12], r.serial)
	var oob []byte
	if len(fds) > 0 {
		oob = syscall.UnixRights(fds...)
	}
	if _, _, err := r.conn.WriteMsgUnix(b, oob, nil); err != nil {
		return 0, err
	}
	return r.serial, nil
}

// Reply reads messages until the answer to serial comes (others are dropped).
func (r *Raw) Reply(serial uint32, timeout time.Duration) (*dbus.Message, error) {
	if err := r.conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, err
	}
	for {
		m, err := r.read()
		if err != nil {
			return nil, err
		}
		if rs, ok := m.Headers[dbus.FieldReplySerial].Value().(uint32); ok && rs == serial {
			return m, nil
		}
	}
}

// Drain reads n answers to calls, whichever they are, and returns how many were errors.
func (r *Raw) Drain(n int, timeout time.Duration) (errs int, err error) {
	if err := r.conn.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return 0, err
	}
	for n > 0 {
		m, err := r.read()
		if err != nil {
			return errs, err
		}
		switch m.Type {
		case dbus.TypeError:
			errs++
			n--
		case dbus.TypeMethodReply:
			n--
		}
	}
	return errs, nil
}

func (r *Raw) read() (*dbus.Message, error) {
	head := make([]byte, 16)
	if _, err := io.ReadFull(r.in, head); err != nil {
		return nil, err
	}
	var order binary.ByteOrder = binary.LittleEndian
	if head[0] == 'B' {
		order = binary.BigEndian
	}
	body, fields := order.Uint32(head[4:8]), order.Uint32(head[12:16])
	fields += (8 - fields%8) % 8
	rest := make([]byte, int(fields)+int(body))
	if _, err := io.ReadFull(r.in, rest); err != nil {
		return nil, err
	}
	return dbus.DecodeMessage(io.MultiReader(bytes.NewReader(head), bytes.NewReader(rest)))
}

// Close disconnects.
func (r *Raw) Close() error { return r.conn.Close() }
