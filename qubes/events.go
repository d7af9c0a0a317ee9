package qubes

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
)

// EventKind classifies the events qcrypt reacts to; everything else is EventOther.
type EventKind int

// The event kinds.
const (
	// EventOther is every event qcrypt does not react to.
	EventOther EventKind = iota
	// EventResync is qubesd's "connection-established" record: the first record of every
	// (re)connection. Events before it may have been missed, so state must be re-read.
	EventResync
	// EventDisconnected is synthesised by the stream when the connection ends; Err says why.
	EventDisconnected
	EventDomainPreStart
	EventDomainStart
	EventDomainStartFailed
	EventDomainPreShutdown
	EventDomainShutdown
	EventDomainStopped
	EventDomainPaused
	EventDomainUnpaused
	EventDeviceAttach
	EventDeviceDetach
	EventDeviceListChange
	EventDeviceAdded
	EventDeviceRemoved
	// EventDomainAdd and EventDomainDelete are global events: their Subject is set to the
	// qube created or deleted (the vm argument), which qubesd sends as the argument.
	EventDomainAdd
	EventDomainDelete
)

var eventNames = map[string]EventKind{
	"connection-established":   EventResync,
	"domain-pre-start":         EventDomainPreStart,
	"domain-start":             EventDomainStart,
	"domain-start-failed":      EventDomainStartFailed,
	"domain-pre-shutdown":      EventDomainPreShutdown,
	"domain-shutdown":          EventDomainShutdown,
	"domain-stopped":           EventDomainStopped,
	"domain-paused":            EventDomainPaused,
	"domain-unpaused":          EventDomainUnpaused,
	"device-attach:block":      EventDeviceAttach,
	"device-detach:block":      EventDeviceDetach,
	"device-list-change:block": EventDeviceListChange,
	"device-added:block":       EventDeviceAdded,
	"device-removed:block":     EventDeviceRemoved,
	"domain-add":               EventDomainAdd,
	"domain-delete":            EventDomainDelete,
}

func (k EventKind) String() string {
	if k == EventDisconnected {
		return "disconnected"
	}
	for name, kind := range eventNames {
		if kind == k {
			return name
		}
	}
	return "other"
}

// Event is one record of admin.Events. Subject is a validated qube name or empty for
// global events; Device is set for block device events whose device could be parsed.
type Event struct {
	Kind    EventKind
	Subject string
	Name    string            // raw event name, printable
	Args    map[string]string // raw keyword arguments, untrusted
	Device  DeviceRef
	Err     error // EventDisconnected only
}

// Limits on one record: qubesd's records are small; a larger one is a broken or
// hostile stream, not something to buffer.
const (
	maxEventField = 64 << 10
	maxEventArgs  = 64
)

// EventReader parses the admin.Events record stream.
type EventReader struct {
	r *bufio.Reader
}

// NewEventReader reads records from r (the connection after the request was sent).
func NewEventReader(r io.Reader) *EventReader {
	return &EventReader{r: bufio.NewReaderSize(r, 4096)}
}

// Next returns the next record. io.EOF means the stream ended at a record boundary.
func (er *EventReader) Next() (Event, error) {
	status, err := er.field()
	if err != nil {
		if errors.Is(err, io.EOF) && status == "" {
			return Event{}, io.EOF
		}
		return Event{}, er.truncated(err)
	}
	if status != "1" {
		if status == "2" {
			// An exception instead of events, e.g. an unknown destination.
			typ, _ := er.field()
			_, _ = er.field() // the traceback: never shown
			msg, _ := er.field()
			return Event{}, newError(typ, msg)
		}
		return Event{}, fmt.Errorf("%w: non-event record on the events connection", ErrProtocol)
	}
	subject, err := er.field()
	if err != nil {
		return Event{}, er.truncated(err)
	}
	name, err := er.field()
	if err != nil {
		return Event{}, er.truncated(err)
	}
	ev := Event{Subject: subject, Name: Printable(name, 128), Args: map[string]string{}}
	for n := 0; ; n++ {
		key, err := er.field()
		if err != nil {
			return Event{}, er.truncated(err)
		}
		if key == "" {
			break
		}
		val, err := er.field()
		if err != nil {
			return Event{}, er.truncated(err)
		}
		if n >= maxEventArgs {
			return Event{}, fmt.Errorf("%w: event with more than %d arguments", ErrProtocol, maxEventArgs)
		}
		ev.Args[key] = val
	}
	if subject != "" {
		if err := ValidateVMName(subject); err != nil {
			return Event{}, fmt.Errorf("%w: event subject: %w", ErrProtocol, err)
		}
	}
	ev.Kind = eventNames[name]
	if ev.Kind == EventDomainAdd || ev.Kind == EventDomainDelete {
		if subject != "" || ValidateVMName(ev.Args["vm"]) != nil {
			ev.Kind = EventOther // not the global event with a qube name: ignored
		} else {
			ev.Subject = ev.Args["vm"]
		}
	}
	ev.Device = eventDevice(ev)
	return ev, nil
}

func (er *EventReader) truncated(err error) error {
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: event stream ended inside a record", ErrProtocol)
	}
	return err
}

// field reads one NUL-terminated field of at most maxEventField bytes.
func (er *EventReader) field() (string, error) {
	var b []byte
	for {
		chunk, err := er.r.ReadSlice(0)
		b = append(b, chunk...)
		if len(b) > maxEventField+1 {
			return "", fmt.Errorf("%w: event field longer than %d bytes", ErrProtocol, maxEventField)
		}
		if err == nil {
			return string(b[:len(b)-1]), nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			if len(b) == 0 {
				return "", err
			}
			return "x", err // partial field: never a clean EOF
		}
	}
}

// eventDevice normalises the device of a block event to {backend, port}:
// R4.1/R4.2 device="backend:ident"; R4.3+ device="backend:port:devid", port="backend:port".
func eventDevice(ev Event) DeviceRef {
	var raw string
	switch ev.Kind {
	case EventDeviceAttach, EventDeviceAdded:
		raw = ev.Args["device"]
	case EventDeviceDetach, EventDeviceRemoved:
		raw = ev.Args["port"]
		if raw == "" {
			raw = ev.Args["device"]
		}
	default:
		return DeviceRef{}
	}
	parts := strings.SplitN(raw, ":", 3)
	if len(parts) < 2 {
		return DeviceRef{}
	}
	ref := DeviceRef{Backend: parts[0], Port: parts[1]}
	if checkRef(ref) != nil {
		return DeviceRef{}
	}
	return ref
}

// Backoff bounds the delay between reconnection attempts; it doubles per failure.
type Backoff struct {
	Min, Max time.Duration
}

// DefaultBackoff starts near qubesadmin's 1 s reconnect delay and caps at 30 s.
var DefaultBackoff = Backoff{Min: 500 * time.Millisecond, Max: 30 * time.Second}

// Events subscribes to every event of every qube (dest dom0) and keeps the subscription
// alive: when the connection breaks it sends EventDisconnected, waits with backoff and
// reconnects; each new connection starts with EventResync. The channel is closed when
// ctx ends.
func (c *Client) Events(ctx context.Context, b Backoff) <-chan Event {
	out := make(chan Event, 64)
	go func() {
		defer close(out)
		delay := b.Min
		for {
			established, err := c.streamEvents(ctx, out)
			if ctx.Err() != nil {
				return
			}
			if established {
				delay = b.Min
			}
			select {
			case out <- Event{Kind: EventDisconnected, Name: "disconnected", Err: err}:
			case <-ctx.Done():
				return
			}
			select {
			case <-time.After(delay):
			case <-ctx.Done():
				return
			}
			delay = min(delay*2, b.Max)
		}
	}()
	return out
}

// streamEvents runs one connection until it fails; established reports whether
// qubesd's connection-established record arrived.
func (c *Client) streamEvents(ctx context.Context, out chan<- Event) (established bool, err error) {
	raw, err := Request{Method: "admin.Events", Dest: "dom0"}.Encode()
	if err != nil {
		return false, err
	}
	conn, err := c.dial(ctx)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	stop := closeOnDone(ctx, conn)
	defer stop()
	if _, err := conn.Write(raw); err != nil {
		return false, err
	}
	if err := conn.CloseWrite(); err != nil {
		return false, err
	}
	er := NewEventReader(conn)
	for {
		ev, err := er.Next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = errors.New("qubesd closed the event stream")
			}
			return established, ctxErr(ctx, err)
		}
		if !established {
			if ev.Kind != EventResync {
				return false, fmt.Errorf("%w: first event is %q, not connection-established", ErrProtocol, ev.Name)
			}
			established = true
		}
		select {
		case out <- ev:
		case <-ctx.Done():
			return established, ctx.Err()
		}
	}
}

// EncodeEvent renders one event record (simulator side). Keys must be non-empty.
func EncodeEvent(subject, name string, args ...string) []byte {
	b := []byte{statusEvent, 0}
	b = append(b, subject...)
	b = append(b, 0)
	b = append(b, name...)
	b = append(b, 0)
	for _, a := range args {
		b = append(b, a...)
		b = append(b, 0)
	}
	return append(b, 0)
}
