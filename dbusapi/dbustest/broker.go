package dbustest

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// startBroker runs dbus-broker as systemd runs it on dom0: dbus-broker-launch gets the
// listening socket (socket activation), says READY=1 on NOTIFY_SOCKET, and logs to the
// journal. Without systemd here, the test is all three: it passes the socket, reads the
// notification, and serves a journal socket whose messages go to stderr (bwrap binds it
// at /run/systemd/journal/socket in a private mount namespace, where the launcher
// looks for it).
func startBroker(dir, cfg, busSock, busType string) (addr string, stop func(), err error) {
	addr = "unix:path=" + busSock
	listener, err := net.ListenUnix("unix", &net.UnixAddr{Name: busSock, Net: "unix"})
	if err != nil {
		return "", nil, fmt.Errorf("cannot listen on the bus socket: %w", err)
	}
	listener.SetUnlinkOnClose(false) // a restarted bus listens at the same path
	// Everyone may connect, as to dom0's bus (systemd's SocketMode=0666); the policy decides.
	if err := os.Chmod(busSock, 0o666); err != nil {
		_ = listener.Close()
		return "", nil, fmt.Errorf("cannot open the bus socket to everyone: %w", err)
	}
	listenFile, err := listener.File()
	_ = listener.Close()
	if err != nil {
		return "", nil, fmt.Errorf("cannot pass the bus socket: %w", err)
	}
	defer listenFile.Close()

	journalDir := filepath.Join(dir, "journal")
	if err := os.MkdirAll(journalDir, 0o755); err != nil {
		return "", nil, fmt.Errorf("cannot make the journal directory: %w", err)
	}
	journal, err := listenDatagrams(filepath.Join(journalDir, "socket"))
	if err != nil {
		return "", nil, err
	}
	notify, err := listenDatagrams(filepath.Join(dir, "bus-ready.sock"))
	if err != nil {
		_ = journal.Close()
		return "", nil, err
	}
	go forwardJournal(journal)

	scope := "system"
	if busType == "session" {
		scope = "user"
	}
	cmd := exec.Command("bwrap", "--dev-bind", "/", "/", "--tmpfs", "/run", "--bind", journalDir, "/run/systemd/journal",
		"--", "sh", "-c", `LISTEN_PID=$$ exec dbus-broker-launch --scope "$1" --config-file "$2"`, "sh", scope, cfg)
	// The launcher is also a client of the bus it runs (it asks systemd for activations).
	cmd.Env = append(os.Environ(), "LISTEN_FDS=1", "NOTIFY_SOCKET="+notify.LocalAddr().String(),
		"DBUS_SYSTEM_BUS_ADDRESS="+addr, "DBUS_SESSION_BUS_ADDRESS="+addr)
	cmd.ExtraFiles = []*os.File{listenFile} // descriptor 3
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		_ = journal.Close()
		_ = notify.Close()
		return "", nil, fmt.Errorf("cannot start dbus-broker-launch: %w", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	stop = func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // bwrap, the launcher, the broker
		<-exited
		_ = journal.Close()
		_ = notify.Close()
	}
	if err := waitReady(notify, exited); err != nil {
		stop()
		return "", nil, err
	}
	_ = notify.Close()
	return addr, stop, nil
}

func listenDatagrams(path string) (*net.UnixConn, error) {
	_ = os.Remove(path)
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("cannot listen on %s: %w", path, err)
	}
	return conn, nil
}

// waitReady waits for READY=1 from the launcher, or its end.
func waitReady(notify *net.UnixConn, exited <-chan struct{}) error {
	got := make(chan error, 1)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := notify.Read(buf)
			if err != nil {
				got <- err
				return
			}
			for _, line := range strings.Split(string(buf[:n]), "\n") {
				if line == "READY=1" {
					got <- nil
					return
				}
			}
		}
	}()
	// Generous: only a broken launcher takes long, and it exits.
	select {
	case err := <-got:
		if err != nil {
			return fmt.Errorf("cannot read dbus-broker's readiness: %w", err)
		}
		return nil
	case <-exited:
		return errors.New("dbus-broker-launch exited before it was ready (its log is above)")
	case <-time.After(2 * time.Minute):
		return errors.New("dbus-broker-launch did not say READY=1 in 2 minutes")
	}
}

// forwardJournal writes the launcher's and the broker's journal messages to stderr, as
// dbus-daemon writes its own.
func forwardJournal(conn *net.UnixConn) {
	buf := make([]byte, 1<<16)
	for {
		n, err := conn.Read(buf)
		if err != nil {
			return
		}
		var msg []byte
		notice := true
		for _, field := range bytes.Split(buf[:n], []byte("\n")) {
			if m, ok := bytes.CutPrefix(field, []byte("MESSAGE=")); ok {
				msg = m
			} else if p, ok := bytes.CutPrefix(field, []byte("PRIORITY=")); ok {
				notice = len(p) == 1 && p[0] <= '5' // info and debug are only noise here
			}
		}
		if msg != nil && notice {
			fmt.Fprintf(os.Stderr, "dbus-broker: %s\n", msg)
		}
	}
}
