package ctl

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/qcrypt/qcrypt/dbusapi"
)

// notifier posts org.freedesktop.Notifications for chain events: one notification per
// chain that replaces the previous one, and at most one per chain per MinGap (a burst
// shows its last event).
type notifier struct {
	conn   *dbus.Conn
	chain  func(name string) (dbusapi.ChainInfo, error)
	errs   io.Writer // failed Notify calls are told here
	MinGap time.Duration

	mu      sync.Mutex
	ids     map[string]uint32
	last    map[string]time.Time
	pending map[string]*time.Timer
}

type note struct {
	summary, body string
	critical      bool
}

func newNotifier(conn *dbus.Conn, chain func(string) (dbusapi.ChainInfo, error), errs io.Writer) *notifier {
	return &notifier{conn: conn, chain: chain, errs: errs, MinGap: 2 * time.Second, ids: map[string]uint32{}, last: map[string]time.Time{}, pending: map[string]*time.Timer{}}
}

// describe turns a state change into a notification, or nil for changes not worth one.
// Bodies are fixed text plus names from root's configuration, markup-escaped; what a
// qube said (an error's details) stays in qcryptctl status and the journal.
func (n *notifier) describe(ev dbusapi.ChainEvent) *note {
	chain := ev.Chain
	switch {
	case ev.State == ev.Previous:
		return nil // a new step or waiting text: nothing to tell
	case ev.State == dbusapi.ChainOpen && ev.Reason.Cause == dbusapi.CauseFoundOpen:
		return nil // qcryptd (re)started and found it open: nothing happened
	case ev.State == dbusapi.ChainOpen:
		body := "The chain is open."
		if ci, err := n.chain(ev.Chain); err == nil && ci.MountPoint != "" {
			body = fmt.Sprintf("Mounted on %s in %s.", markup(ci.MountPoint), markup(ci.Target))
		}
		return &note{summary: "qcrypt: " + chain + " opened", body: body}
	case ev.State == dbusapi.ChainFailed || ev.State == dbusapi.ChainDegraded:
		return &note{summary: "qcrypt: " + chain + " " + string(ev.State), body: "Details: qcryptctl status " + markup(chain), critical: true}
	case ev.State == dbusapi.ChainWaiting && ev.Reason.Cause == dbusapi.CauseKeystoreLocked:
		return &note{summary: "qcrypt: " + chain + " needs the key store", body: "It opens once the key store is unlocked: qcryptctl keystore unlock"}
	case ev.Previous == dbusapi.ChainClosing && (ev.State == dbusapi.ChainClosed || ev.State == dbusapi.ChainWaiting):
		return &note{summary: "qcrypt: " + chain + " closed", body: "The chain is closed."}
	case ev.State == dbusapi.ChainOpening && ev.Reason.Cause == dbusapi.CauseDeviceAppeared:
		return &note{summary: "qcrypt: device for " + chain + " appeared", body: "Opening the chain."}
	}
	return nil
}

// markup escapes text for a notification body, which servers may read as markup.
func markup(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", "'", "&#39;", `"`, "&quot;").Replace(s)
}

func (n *notifier) handle(ev dbusapi.ChainEvent) {
	nt := n.describe(ev)
	if nt == nil {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if t := n.pending[ev.Chain]; t != nil {
		t.Stop()
		delete(n.pending, ev.Chain)
	}
	if wait := n.MinGap - time.Since(n.last[ev.Chain]); wait > 0 && !nt.critical {
		n.pending[ev.Chain] = time.AfterFunc(wait, func() {
			n.mu.Lock()
			defer n.mu.Unlock()
			delete(n.pending, ev.Chain)
			n.send(ev.Chain, nt)
		})
		return
	}
	n.send(ev.Chain, nt)
}

// send calls Notify (n.mu held).
func (n *notifier) send(chain string, nt *note) {
	urgency := byte(1)
	timeout := int32(-1)
	if nt.critical {
		urgency, timeout = 2, 0
	}
	hints := map[string]dbus.Variant{"urgency": dbus.MakeVariant(urgency), "desktop-entry": dbus.MakeVariant("qcryptctl-notify-agent")}
	var id uint32
	err := n.conn.Object("org.freedesktop.Notifications", "/org/freedesktop/Notifications").Call(
		"org.freedesktop.Notifications.Notify", 0, "qcrypt", n.ids[chain], "drive-harddisk", nt.summary, nt.body,
		[]string{}, hints, timeout).Store(&id)
	if err != nil {
		fmt.Fprintf(n.errs, "qcryptctl notify-agent: cannot notify %q: %v\n", nt.summary, err)
	} else {
		n.ids[chain] = id
	}
	n.last[chain] = time.Now()
}

// agentName is the session bus name the notification agent owns: one per session.
const agentName = "org.qcrypt.NotifyAgent"

// cmdNotifyAgent runs for the whole desktop session (XDG autostart): it waits for
// qcryptd, follows it across restarts and ends with the session (its login session's
// leader exits, or its session bus goes away: logind does not kill what a session
// leaves behind by default) or a signal.
func cmdNotifyAgent(a *app, p *parsed) error {
	sess, err := a.session()
	if err != nil {
		return fmt.Errorf("cannot connect to the session bus: %w", err)
	}
	defer sess.Close()
	if r, err := sess.RequestName(agentName, dbus.NameFlagDoNotQueue); err != nil {
		return fmt.Errorf("cannot own %s on the session bus: %w", agentName, err)
	} else if r != dbus.RequestNameReplyPrimaryOwner {
		fmt.Fprintln(a.err, "qcryptctl notify-agent: another one runs in this session")
		return nil
	}
	api, err := a.watcher()
	if err != nil {
		return err
	}
	defer api.Disconnect()
	n := newNotifier(sess, func(name string) (dbusapi.ChainInfo, error) {
		ctx, cancel := context.WithTimeout(a.ctx, 5*time.Second)
		defer cancel()
		return api.Chain(ctx, name)
	}, a.err)
	ctx, cancel := context.WithCancel(a.ctx)
	defer cancel()
	loggedOut, err := sessionEnd(ctx, api.Conn())
	if err != nil {
		fmt.Fprintln(a.err, "qcryptctl notify-agent:", err, "(it ends with its session bus only)")
	}
	go func() {
		select {
		case <-sess.Context().Done():
		case <-loggedOut:
		}
		cancel()
	}()
	err = api.Watch(ctx, dbusapi.Watcher{Change: n.handle})
	if ctx.Err() != nil && a.ctx.Err() == nil {
		return nil // the session ended
	}
	return err
}
