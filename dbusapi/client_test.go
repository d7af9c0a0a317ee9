package dbusapi

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi/dbustest"
)

// privateBus starts a dbus-daemon for one test and points the client at it.
func privateBus(t *testing.T) string {
	t.Helper()
	dbustest.Need(t)
	addr, stop, err := dbustest.Start(t.TempDir(), dbustest.Permissive)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", addr)
	return addr
}

func connect(t *testing.T, addr string) *dbus.Conn {
	t.Helper()
	conn, err := dbus.Connect(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// fakeQcryptd owns the bus name and answers Open with job 1, whose state it reports
// as running; jobRead is signalled when the client has read that state.
type fakeQcryptd struct {
	jobRead chan struct{}
	chains  []ChainInfo
}

func (f *fakeQcryptd) Open(chain string, options map[string]dbus.Variant) (dbus.ObjectPath, *dbus.Error) {
	return JobPath(1), nil
}

type fakeObjects struct{ f *fakeQcryptd }

func (o fakeObjects) GetManagedObjects() (map[dbus.ObjectPath]map[string]map[string]dbus.Variant, *dbus.Error) {
	out := map[dbus.ObjectPath]map[string]map[string]dbus.Variant{}
	for _, c := range o.f.chains {
		out[ChainPath(c.Name)] = map[string]map[string]dbus.Variant{ChainInterface: chainInfoCodec.encode(&c)}
	}
	return out, nil
}

type fakeJobProps struct{ f *fakeQcryptd }

func (p fakeJobProps) GetAll(iface string) (map[string]dbus.Variant, *dbus.Error) {
	defer func() { p.f.jobRead <- struct{}{} }()
	v := dbus.MakeVariant
	return map[string]dbus.Variant{"Operation": v("open"), "Chain": v("demo"), "State": v("running"), "Step": v(uint32(1)),
		"Steps": v(uint32(5)), "StepDescription": v("x"), "Bytes": v(uint64(0)), "TotalBytes": v(uint64(0)),
		"Message": v(""), "StartedByUID": v(uint32(0))}, nil
}

func startFake(t *testing.T, addr string, chains ...ChainInfo) (*dbus.Conn, *fakeQcryptd) {
	t.Helper()
	conn := connect(t, addr)
	f := &fakeQcryptd{jobRead: make(chan struct{}, 4), chains: chains}
	if err := conn.Export(f, ManagerPath, ManagerInterface); err != nil {
		t.Fatal(err)
	}
	if err := conn.Export(fakeObjects{f}, ManagerPath, objectManagerInterface); err != nil {
		t.Fatal(err)
	}
	if err := conn.Export(fakeJobProps{f}, JobPath(1), propertiesInterface); err != nil {
		t.Fatal(err)
	}
	if r, err := conn.RequestName(BusName, dbus.NameFlagDoNotQueue); err != nil || r != dbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("cannot own the name: %v %v", r, err)
	}
	return conn, f
}

// forge sends, from a connection that does not own qcryptd's name, a signal both
// straight to the victim (unicast passes every match rule) and to everyone, then waits
// until the bus has passed both on.
func forge(t *testing.T, forger *dbus.Conn, victim string, path dbus.ObjectPath, member string, args ...any) {
	t.Helper()
	for _, dest := range []string{victim, ""} {
		msg := &dbus.Message{Type: dbus.TypeSignal, Headers: map[dbus.HeaderField]dbus.Variant{
			dbus.FieldPath: dbus.MakeVariant(path), dbus.FieldInterface: dbus.MakeVariant(member[:strings.LastIndex(member, ".")]),
			dbus.FieldMember: dbus.MakeVariant(member[strings.LastIndex(member, ".")+1:])}, Body: args}
		if dest != "" {
			msg.Headers[dbus.FieldDestination] = dbus.MakeVariant(dest)
		}
		if len(args) > 0 {
			msg.Headers[dbus.FieldSignature] = dbus.MakeVariant(dbus.SignatureOf(args...))
		}
		if call := forger.Send(msg, nil); call.Err != nil {
			t.Fatal(call.Err)
		}
	}
	// The bus handles one connection's messages in order: after this reply it has routed
	// the forged ones.
	if err := forger.BusObject().Call("org.freedesktop.DBus.Peer.Ping", 0).Err; err != nil {
		t.Fatal(err)
	}
}

// forgeWorld is a private bus with a fake qcryptd owning the name, a forger (any other
// connection) and a client of the fake.
func forgeWorld(t *testing.T, chains ...ChainInfo) (server *dbus.Conn, fake *fakeQcryptd, forger *dbus.Conn, c *Client) {
	t.Helper()
	addr := privateBus(t)
	server, fake = startFake(t, addr, chains...)
	forger = connect(t, addr)
	c, err := Connect()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Disconnect() })
	return server, fake, forger, c
}

func TestRunJobBelievesOnlyQcryptd(t *testing.T) {
	server, fake, forger, c := forgeWorld(t)

	type outcome struct {
		r   JobResult
		err error
	}
	done := make(chan outcome, 1)
	go func() {
		r, err := c.RunJob(context.Background(), c.Open("demo", openOpts()), nil)
		done <- outcome{r, err}
	}()
	select {
	case <-fake.jobRead: // subscribed, job started, its state read: now it waits for signals
	case <-time.After(time.Minute):
		t.Fatal("the client never read the job's state")
	}
	victim := c.Conn().Names()[0]
	forge(t, forger, victim, JobPath(1), JobInterface+".Completed", true, "open (forged)")
	forge(t, forger, victim, "/org/freedesktop/DBus", "org.freedesktop.DBus.NameOwnerChanged", BusName, server.Names()[0], "")
	forge(t, forger, victim, JobPath(1), propertiesInterface+".PropertiesChanged", JobInterface, map[string]dbus.Variant{}, []string{})
	select {
	case o := <-done:
		t.Fatalf("the client believed a forged signal: %+v", o)
	default:
	}
	if err := server.Emit(JobPath(1), JobInterface+".Completed", false, "wrong key \x1b[2J"); err != nil {
		t.Fatal(err)
	}
	select {
	case o := <-done:
		if o.err != nil || o.r.Success || o.r.Message != "wrong key ?[2J" {
			t.Errorf("result %+v %v, want the real failure with its escape cleaned", o.r, o.err)
		}
	case <-time.After(time.Minute):
		t.Fatal("the real Completed was not seen")
	}
}

// Progress comes from the values the change signals carry: every step is seen, in
// order, without reading the job again (qcryptctl printed only the steps a read caught).
func TestRunJobProgressFromSignals(t *testing.T) {
	server, fake, _, c := forgeWorld(t)
	var mu sync.Mutex
	var seen []string
	done := make(chan error, 1)
	go func() {
		_, err := c.RunJob(context.Background(), c.Open("demo", openOpts()), func(j JobInfo) {
			mu.Lock()
			seen = append(seen, fmt.Sprintf("%d/%d %s", j.Step, j.Steps, j.StepDescription))
			mu.Unlock()
		})
		done <- err
	}()
	select {
	case <-fake.jobRead:
	case <-time.After(time.Minute):
		t.Fatal("the client never read the job's state")
	}
	v := dbus.MakeVariant
	for _, changed := range []map[string]dbus.Variant{
		{"StepDescription": v("attach \x1b[31m")}, {"Step": v(uint32(2))},
		{"StepDescription": v("decrypt")}, {"Step": v(uint32(3))},
	} {
		if err := server.Emit(JobPath(1), propertiesInterface+".PropertiesChanged", JobInterface, changed, []string{}); err != nil {
			t.Fatal(err)
		}
	}
	if err := server.Emit(JobPath(1), JobInterface+".Completed", true, "open"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute):
		t.Fatal("the job's end was not seen")
	}
	mu.Lock()
	defer mu.Unlock()
	want := []string{"1/5 x", "1/5 attach ?[31m", "2/5 attach ?[31m", "2/5 decrypt", "3/5 decrypt"}
	if strings.Join(seen, "|") != strings.Join(want, "|") {
		t.Errorf("progress %q, want %q", seen, want)
	}
	select {
	case <-fake.jobRead:
		t.Error("the job was read again")
	default:
	}
}

func TestWatchBelievesOnlyQcryptd(t *testing.T) {
	server, _, forger, c := forgeWorld(t)
	events := make(chan ChainEvent, 64)
	presence := make(chan bool, 4)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		_ = c.Watch(ctx, Watcher{Change: func(ev ChainEvent) { events <- ev }, Presence: func(up bool) { presence <- up }})
	}()

	// Until the watch is subscribed nothing arrives: repeat a real change until it does.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for synced := false; !synced; {
		select {
		case ev := <-events:
			synced = ev.Reason.Text == "sync"
		case <-tick.C:
			if err := server.Emit(ChainPath("demo"), ChainInterface+".StateChanged", "waiting", "closed", "done", "sync"); err != nil {
				t.Fatal(err)
			}
		case <-time.After(time.Minute):
			t.Fatal("the watch never subscribed")
		}
	}
	victim := c.Conn().Names()[0]
	forge(t, forger, victim, ChainPath("demo"), ChainInterface+".StateChanged", "open", "opening", "done", "forged")
	forge(t, forger, victim, "/org/freedesktop/DBus", "org.freedesktop.DBus.NameOwnerChanged", BusName, server.Names()[0], "")
	if err := server.Emit(ChainPath("demo"), ChainInterface+".StateChanged", "failed", "opening", "error\x1b", "real \x1b]8;;evil\a"); err != nil {
		t.Fatal(err)
	}
	for seen := false; !seen; {
		select {
		case ev := <-events:
			if ev.Reason.Text == "sync" {
				continue
			}
			if ev != (ChainEvent{Chain: "demo", State: "failed", Previous: "opening", Reason: Because("error?", "real ?]8;;evil?")}) {
				t.Fatalf("event %+v: forged, or not cleaned", ev)
			}
			seen = true
		case <-time.After(time.Minute):
			t.Fatal("the real change was not seen (a forged NameOwnerChanged believed?)")
		}
	}
	select {
	case up := <-presence:
		t.Errorf("a forged NameOwnerChanged was believed (running=%v)", up)
	default:
	}
	// The real departure is believed.
	if _, err := server.ReleaseName(BusName); err != nil {
		t.Fatal(err)
	}
	select {
	case up := <-presence:
		if up {
			t.Error("qcryptd leaving was reported as arriving")
		}
	case <-time.After(time.Minute):
		t.Error("qcryptd leaving the bus was not seen")
	}
}

func TestClientCleansStrings(t *testing.T) {
	_, _, _, c := forgeWorld(t, ChainInfo{Name: "a\x1b[31mb", State: "open\r\u202eevil", Layers: []string{"sys-usb", "\x1b]8;;x"},
		LastError: "bad\tcode"})
	got, err := c.Chains(context.Background())
	if err != nil || len(got) != 1 {
		t.Fatalf("Chains %v %v", got, err)
	}
	if g := got[0]; g.Name != "a?[31mb" || g.State != "open ?evil" || g.Layers[1] != "?]8;;x" || g.LastError != "bad code" {
		t.Errorf("Chains %+v: not cleaned", g)
	}
}

func TestClean(t *testing.T) {
	tests := map[string]struct{ in, want string }{
		"plain text stays":         {"work: open (mounted on /mnt/x)", "work: open (mounted on /mnt/x)"},
		"non-ASCII letters stay":   {"Ärger in qube-ü", "Ärger in qube-ü"},
		"escape sequences":         {"\x1b[2J\x1b]0;title\a", "?[2J?]0;title?"},
		"line breaks become space": {"a\nb\r\tc", "a b  c"},
		"C1 controls":              {"a\u009bb\u0085", "a?b?"},
		"bidi overrides":           {"file\u202etxt.exe\u2066", "file?txt.exe?"},
		"invalid UTF-8":            {"a\xff\xfeb", "a??b"},
		"DEL and NUL":              {"a\x7f\x00b", "a??b"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if got := Clean(tc.in); got != tc.want {
				t.Errorf("Clean(%q) = %q, want %q", tc.in, got, tc.want)
			}
		})
	}
}

func openOpts() chains.OpenOptions { return chains.OpenOptions{} }
