package qubes

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultSocket is where qubesd serves the Admin API in dom0.
const DefaultSocket = "/var/run/qubesd.sock"

// DefaultCallTimeout bounds one call when the caller's context has no earlier deadline.
// admin.vm.Start blocks for up to a qube's qrexec_timeout (60 s by default), so the
// default leaves room for that.
const DefaultCallTimeout = 120 * time.Second

// Client talks to qubesd. It is safe for concurrent use; every call opens its own
// connection, as qubesd serves one request per connection.
type Client struct {
	socket  string
	timeout time.Duration
	calls   atomic.Int64

	apiMu sync.Mutex
	api   DeviceAPI // detected lazily, see DeviceAPI

	readsMu sync.Mutex
	reads   map[[3]string]*Batcher[struct{}, answer] // method, arg, dest; see read
}

type answer struct {
	body []byte
	err  error
}

// NewClient returns a client for the Admin API socket at path (DefaultSocket if empty).
func NewClient(path string) *Client {
	if path == "" {
		path = DefaultSocket
	}
	return &Client{socket: path, timeout: DefaultCallTimeout}
}

// SetTimeout changes the per-call deadline used when the context has none sooner.
func (c *Client) SetTimeout(d time.Duration) { c.timeout = d }

// Socket is the path the client dials.
func (c *Client) Socket() string { return c.socket }

// Calls is the number of Admin API calls made so far (for benchmarks and tests).
func (c *Client) Calls() int64 { return c.calls.Load() }

// Call performs one Admin API call and returns the OK body.
func (c *Client) Call(ctx context.Context, req Request) ([]byte, error) {
	raw, err := req.Encode()
	if err != nil {
		return nil, err
	}
	c.calls.Add(1)
	resp, err := c.roundTrip(ctx, raw)
	if err != nil {
		return nil, fmt.Errorf("cannot call %s on %s: %w", req.Method, req.Dest, err)
	}
	body, err := ParseResponse(resp)
	if err != nil {
		return nil, fmt.Errorf("%s on %s: %w", req.Method, req.Dest, err)
	}
	return body, nil
}

// read is Call for a request that changes nothing and has no payload: concurrent identical
// reads share one call, and none gets an answer older than itself (see Batcher). Fifty
// chains opening at one event then list the qubes a couple of times, not fifty.
func (c *Client) read(ctx context.Context, req Request) ([]byte, error) {
	key := [3]string{req.Method, req.Arg, req.Dest}
	c.readsMu.Lock()
	b := c.reads[key]
	if b == nil {
		if c.reads == nil {
			c.reads = map[[3]string]*Batcher[struct{}, answer]{}
		}
		b = NewBatcher(func(ctx context.Context, _ []struct{}) map[struct{}]answer {
			body, err := c.Call(ctx, req)
			return map[struct{}]answer{{}: {body, err}}
		})
		c.reads[key] = b
	}
	c.readsMu.Unlock()
	a, err := b.Do(ctx, struct{}{})
	if err != nil {
		return nil, fmt.Errorf("cannot call %s on %s: %w", req.Method, req.Dest, err)
	}
	return a.body, a.err
}

func (c *Client) roundTrip(ctx context.Context, raw []byte) ([]byte, error) {
	if _, ok := ctx.Deadline(); !ok && c.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.timeout)
		defer cancel()
	}
	conn, err := c.dial(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stop := closeOnDone(ctx, conn)
	defer stop()

	if _, err := conn.Write(raw); err != nil {
		return nil, ctxErr(ctx, err)
	}
	if err := conn.CloseWrite(); err != nil {
		return nil, ctxErr(ctx, err)
	}
	resp, err := io.ReadAll(io.LimitReader(conn, MaxResponse+1))
	if err != nil {
		return nil, ctxErr(ctx, err)
	}
	if len(resp) > MaxResponse {
		return nil, fmt.Errorf("%w: response larger than %d bytes", ErrProtocol, MaxResponse)
	}
	return resp, nil
}

func (c *Client) dial(ctx context.Context) (*net.UnixConn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.socket)
	if err != nil {
		return nil, err
	}
	return conn.(*net.UnixConn), nil
}

// closeOnDone makes blocking socket I/O return when ctx ends.
func closeOnDone(ctx context.Context, conn net.Conn) (stop func()) {
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			_ = conn.SetDeadline(time.Unix(1, 0)) // fails only on a closed conn: done too
		case <-done:
		}
	}()
	return func() { close(done) }
}

// ctxErr prefers the context's error over the I/O error it caused.
func ctxErr(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return context.DeadlineExceeded
	}
	return err
}
