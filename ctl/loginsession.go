package ctl

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"
)

// The notification agent belongs to one login session. Its session bus may outlive the
// session (a user bus lasts while any process of the user's does, and logind kills
// nothing a session leaves behind by default), so the agent also ends when logind's
// session does: when its leader (the display manager's session process, or runuser's)
// exits, the session is over.

// sessionLeader asks logind for the leader of the login session id (XDG_SESSION_ID).
func sessionLeader(conn *dbus.Conn, id string) (int, error) {
	var path dbus.ObjectPath
	if err := conn.Object("org.freedesktop.login1", "/org/freedesktop/login1").
		Call("org.freedesktop.login1.Manager.GetSession", 0, id).Store(&path); err != nil {
		return 0, fmt.Errorf("cannot find login session %s: %w", id, err)
	}
	v, err := conn.Object("org.freedesktop.login1", path).GetProperty("org.freedesktop.login1.Session.Leader")
	if err != nil {
		return 0, fmt.Errorf("cannot read the leader of login session %s: %w", id, err)
	}
	leader, ok := v.Value().(uint32)
	if !ok || leader == 0 {
		return 0, fmt.Errorf("login session %s has no leader", id)
	}
	return int(leader), nil
}

// sessionEnd returns a channel closed when the login session ends: when its leader
// process exits (watched through a pidfd, so a reused pid cannot fool it). No session
// (XDG_SESSION_ID unset) or no logind: a channel that never closes.
func sessionEnd(ctx context.Context, system *dbus.Conn) (<-chan struct{}, error) {
	ended := make(chan struct{})
	id := os.Getenv("XDG_SESSION_ID")
	if id == "" || system == nil {
		return ended, nil
	}
	leader, err := sessionLeader(system, id)
	if err != nil {
		return ended, err
	}
	fd, err := unix.PidfdOpen(leader, 0)
	if errors.Is(err, unix.ESRCH) {
		close(ended) // the leader is gone already: so is the session
		return ended, nil
	}
	if err != nil {
		return ended, fmt.Errorf("cannot watch the leader of login session %s: %w", id, err)
	}
	go func() {
		defer unix.Close(fd)
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for ctx.Err() == nil {
			// A pidfd turns readable when its process exits. The timeout only lets ctx end
			// the watch.
			if n, err := unix.Poll(fds, 1000); err == nil && n > 0 {
				close(ended)
				return
			}
		}
	}()
	return ended, nil
}
