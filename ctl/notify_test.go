package ctl

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/prop"

	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/dbusapi/dbustest"
)

// fakeNotifications records Notify calls, as a desktop's notification server would get them.
type fakeNotifications struct {
	mu     sync.Mutex
	calls  []notifyCall
	next   uint32
	called chan struct{} // a value per call
}

type notifyCall struct {
	Replaces      uint32
	Summary, Body string
	Urgency       byte
	Timeout       int32
}

func (f *fakeNotifications) Notify(app string, replaces uint32, icon, summary, body string, actions []string, hints map[string]dbus.Variant, timeout int32) (uint32, *dbus.Error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var urgency byte
	if err := hints["urgency"].Store(&urgency); err != nil {
		return 0, dbus.MakeFailedError(fmt.Errorf("urgency hint: %w", err))
	}
	f.calls = append(f.calls, notifyCall{replaces, summary, body, urgency, timeout})
	f.called <- struct{}{}
	if replaces != 0 {
		return replaces, nil
	}
	f.next++
	return f.next, nil
}

func (f *fakeNotifications) get() []notifyCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]notifyCall(nil), f.calls...)
}

func sessionBus(t *testing.T) string {
	t.Helper()
	dbustest.Need(t)
	addr, stop, err := dbustest.StartConfig(t.TempDir(), dbustest.Config{Type: "session", Policy: dbustest.Permissive})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	return addr
}

// notificationServer is a desktop's notification server on the session bus at addr.
func notificationServer(t *testing.T, addr string) (*fakeNotifications, *dbus.Conn) {
	t.Helper()
	server, err := dbus.Connect(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	fake := &fakeNotifications{called: make(chan struct{}, 64)}
	if err := server.Export(fake, "/org/freedesktop/Notifications", "org.freedesktop.Notifications"); err != nil {
		t.Fatal(err)
	}
	if r, err := server.RequestName("org.freedesktop.Notifications", dbus.NameFlagDoNotQueue); err != nil || r != dbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("name: %v %v", r, err)
	}
	return fake, server
}

func TestNotifyAgent(t *testing.T) {
	addr := sessionBus(t)
	fake, _ := notificationServer(t, addr)
	agentConn, err := dbus.Connect(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer agentConn.Close()
	var errs bytes.Buffer
	n := newNotifier(agentConn, func(name string) (dbusapi.ChainInfo, error) {
		return dbusapi.ChainInfo{Name: name, Target: "work", MountPoint: "/mnt/" + name + "<b>&"}, nil
	}, &errs)
	n.MinGap = 300 * time.Millisecond
	n.handle(dbusapi.ChainEvent{Chain: "usb", State: "waiting", Previous: "waiting", Reason: dbusapi.Because(dbusapi.CauseDeviceGone, "a new waiting text")}) // no change of state

	n.handle(dbusapi.ChainEvent{Chain: "usb", State: "opening", Previous: "waiting", Reason: dbusapi.Because(dbusapi.CauseDeviceAppeared, "a device appeared in sys-usb")})
	n.handle(dbusapi.ChainEvent{Chain: "demo", State: "opening", Previous: "waiting", Reason: dbusapi.Because(dbusapi.CauseQubeStarted, "work started")}) // not worth a note
	n.handle(dbusapi.ChainEvent{Chain: "old", State: "open", Previous: "closed", Reason: dbusapi.Because(dbusapi.CauseFoundOpen, "found open")})          // qcryptd restarted
	n.handle(dbusapi.ChainEvent{Chain: "demo", State: "open", Previous: "opening", Reason: dbusapi.Because(dbusapi.CauseDone, "open")})
	n.handle(dbusapi.ChainEvent{Chain: "demo", State: "closing", Previous: "open", Reason: dbusapi.Because(dbusapi.CauseQubeShutDown, "work shut down")})
	n.handle(dbusapi.ChainEvent{Chain: "demo", State: "waiting", Previous: "closing", Reason: dbusapi.Because(dbusapi.CauseQubeShutDown, "work shut down")}) // rate-limited: sent later
	// A failure's reason may hold a qube's words: never in a notification.
	n.handle(dbusapi.ChainEvent{Chain: "usb", State: "failed", Previous: "opening", Reason: dbusapi.Because(dbusapi.CauseError, "<a href='x'>click</a> \x1b]8;;")}) // critical: at once
	for i := 0; i < 4; i++ {                                                                                                                                        // the rate-limited one comes after MinGap
		select {
		case <-fake.called:
		case <-time.After(time.Minute):
			t.Fatalf("%d notifications came: %+v", i, fake.get())
		}
	}
	got := fake.get()
	want := []notifyCall{
		{0, "qcrypt: device for usb appeared", "Opening the chain.", 1, -1},
		{0, "qcrypt: demo opened", "Mounted on /mnt/demo&lt;b&gt;&amp; in work.", 1, -1},
		{1, "qcrypt: usb failed", "Details: qcryptctl status usb", 2, 0},
		{2, "qcrypt: demo closed", "The chain is closed.", 1, -1},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d notifications: %+v", len(got), got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("notification %d: %+v, want %+v", i, got[i], want[i])
		}
	}
}

func TestDesktopFiles(t *testing.T) {
	for _, f := range []string{"../systemd/qcryptctl-notify-agent.desktop"} {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(data), "qcryptctl notify-agent") {
			t.Errorf("%s does not run the agent", f)
		}
	}
}

// The agent started before qcryptd waits for it and notifies its changes; a second agent
// in the session leaves at once (two doubled every notification); the agent ends with
// its session.
func TestNotifyAgentWaitsAndIsAlone(t *testing.T) {
	dbustest.Need(t)
	session, stopSession, err := dbustest.StartConfig(t.TempDir(), dbustest.Config{Type: "session", Policy: dbustest.Permissive})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stopSession)
	system, stop, err := dbustest.Start(t.TempDir(), dbustest.Permissive)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", system)
	t.Setenv("XDG_SESSION_ID", "") // no login session: it ends with its session bus
	fake, server := notificationServer(t, session)
	// Subscribed before the agent starts: its taking its name is not missed.
	if err := server.AddMatchSignal(dbus.WithMatchSender("org.freedesktop.DBus"), dbus.WithMatchMember("NameOwnerChanged"),
		dbus.WithMatchArg(0, agentName)); err != nil {
		t.Fatal(err)
	}
	owners := make(chan *dbus.Signal, 8)
	server.Signal(owners)
	agent := func(ctx context.Context) (int, string) {
		var out, errb bytes.Buffer
		a := &app{out: &out, err: &errb, ctx: ctx, now: time.Now,
			session: func() (*dbus.Conn, error) { return dbus.Connect(session) },
			watcher: func() (API, error) { return dbusapi.ConnectBus() }}
		return a.main([]string{"notify-agent"}), errb.String()
	}
	ctx, cancel := context.WithCancel(context.Background())
	ended := make(chan int, 1)
	go func() { code, _ := agent(ctx); ended <- code }()
	defer func() { cancel(); <-ended }()

	// Once the first owns its name, a second one leaves.
	for owned := false; !owned; {
		select {
		case sig := <-owners:
			owned = sig.Name == "org.freedesktop.DBus.NameOwnerChanged" && len(sig.Body) == 3 && sig.Body[0] == agentName && sig.Body[2] != ""
		case <-time.After(time.Minute):
			t.Fatal("the agent never owned its name")
		}
	}
	if code, errs := agent(context.Background()); code != 0 || !strings.Contains(errs, "another one runs") {
		t.Errorf("second agent: exit %d, %q", code, errs)
	}
	// qcryptd comes after the agent: its changes are notified.
	qcryptd, err := dbus.Connect(system)
	if err != nil {
		t.Fatal(err)
	}
	defer qcryptd.Close()
	if r, err := qcryptd.RequestName(dbusapi.BusName, dbus.NameFlagDoNotQueue); err != nil || r != dbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("name: %v %v", r, err)
	}
	tick := time.NewTicker(100 * time.Millisecond) // until the agent's watch hears one
	defer tick.Stop()
	for notified := false; !notified; {
		select {
		case <-fake.called:
			notified = true
		case <-tick.C:
			if err := qcryptd.Emit(dbusapi.ChainPath("demo"), dbusapi.ChainInterface+".StateChanged", "failed", "opening", "error", "x"); err != nil {
				t.Fatal(err)
			}
		case <-time.After(time.Minute):
			t.Fatal("no notification after qcryptd came")
		}
	}
	if got := fake.get(); got[0].Summary != "qcrypt: demo failed" {
		t.Errorf("notification %+v", got[0])
	}
	// The session ends (its bus goes away, as at a logout): so does its agent.
	stopSession()
	select {
	case code := <-ended:
		ended <- code // for the deferred wait
		if code != 0 {
			t.Errorf("the agent of an ended session exited %d", code)
		}
	case <-time.After(time.Minute):
		t.Fatal("the agent outlives its session")
	}
}

// A chain that waits for a locked key store asks for the unlock; one that waits after a
// close is still just closed.
func TestNotifyKeystoreLocked(t *testing.T) {
	n := &notifier{}
	nt := n.describe(dbusapi.ChainEvent{Chain: "vault", State: dbusapi.ChainWaiting, Previous: dbusapi.ChainOpening,
		Reason: dbusapi.Because(dbusapi.CauseKeystoreLocked, "cannot open vault: key store /etc/blib/keys: the key store is locked")})
	if nt == nil || nt.summary != "qcrypt: vault needs the key store" || !strings.Contains(nt.body, "qcryptctl keystore unlock") || nt.critical {
		t.Errorf("locked store: %+v", nt)
	}
	nt = n.describe(dbusapi.ChainEvent{Chain: "vault", State: dbusapi.ChainWaiting, Previous: dbusapi.ChainClosing,
		Reason: dbusapi.Because(dbusapi.CauseQubeShutDown, "work shut down")})
	if nt == nil || nt.summary != "qcrypt: vault closed" {
		t.Errorf("after a close: %+v", nt)
	}
}

// fakeLogind is logind's part the agent asks: the session's object and its leader.
type fakeLogind struct{ asked chan struct{} }

func (f fakeLogind) GetSession(id string) (dbus.ObjectPath, *dbus.Error) {
	f.asked <- struct{}{}
	if id != "c7" {
		return "", dbus.NewError("org.freedesktop.login1.NoSuchSession", []any{"no session " + id})
	}
	return "/org/freedesktop/login1/session/c7", nil
}

// The agent ends with its login session: when the session's leader exits (logout), even
// though its session bus lives on (a user bus outlives a session while the user has
// processes left, and logind kills none by default).
func TestNotifyAgentEndsWithItsLoginSession(t *testing.T) {
	session := sessionBus(t)
	system, stop, err := dbustest.Start(t.TempDir(), dbustest.Permissive)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", system)
	t.Setenv("XDG_SESSION_ID", "c7")
	leader := exec.Command("sleep", "600")
	if err := leader.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { leader.Process.Kill(); _ = leader.Wait() }()
	logind, err := dbus.Connect(system)
	if err != nil {
		t.Fatal(err)
	}
	defer logind.Close()
	asked := make(chan struct{}, 1)
	if err := logind.Export(fakeLogind{asked}, "/org/freedesktop/login1", "org.freedesktop.login1.Manager"); err != nil {
		t.Fatal(err)
	}
	if _, err := prop.Export(logind, "/org/freedesktop/login1/session/c7", prop.Map{"org.freedesktop.login1.Session": {
		"Leader": {Value: uint32(leader.Process.Pid)}}}); err != nil {
		t.Fatal(err)
	}
	if r, err := logind.RequestName("org.freedesktop.login1", dbus.NameFlagDoNotQueue); err != nil || r != dbus.RequestNameReplyPrimaryOwner {
		t.Fatalf("name: %v %v", r, err)
	}
	notificationServer(t, session)
	var out, errb bytes.Buffer
	a := &app{out: &out, err: &errb, ctx: context.Background(), now: time.Now,
		session: func() (*dbus.Conn, error) { return dbus.Connect(session) },
		watcher: func() (API, error) { return dbusapi.ConnectBus() }}
	ended := make(chan int, 1)
	go func() { ended <- a.main([]string{"notify-agent"}) }()
	// The agent looks its session up, then runs until the session's leader exits (it may
	// exit before the agent watches it: it then ends at once).
	select {
	case code := <-ended:
		t.Fatalf("the agent ended before it looked its session up: exit %d %s", code, errb.String())
	case <-asked:
	case <-time.After(time.Minute):
		t.Fatal("the agent never asked logind for its session")
	}
	leader.Process.Kill()
	_ = leader.Wait()
	select {
	case code := <-ended:
		if code != 0 || errb.Len() != 0 {
			t.Errorf("the agent of a logged-out session: exit %d, %q", code, errb.String())
		}
	case <-time.After(time.Minute):
		t.Fatal("the agent outlives its login session")
	}
}
