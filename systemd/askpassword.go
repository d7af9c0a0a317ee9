package systemd

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// systemd's password agent protocol (docs/PASSWORD_AGENTS.md in systemd): who needs a
// password drops an ini file ask.XXXX into AskPasswordDir naming a datagram socket;
// any agent (a terminal, Plymouth, a desktop) asks the user and sends "+password", or
// "-" when the user declined, to that socket. The first answer wins.

// AskPasswordDir is where agents look for questions.
const AskPasswordDir = "/run/systemd/ask-password"

// ErrPasswordDeclined is the answer of an agent whose user declined.
var ErrPasswordDeclined = errors.New("the password entry was declined")

// Question is one password request.
type Question struct {
	Dir     string // AskPasswordDir when empty
	Message string // one line, shown by the agent
	Icon    string // an XDG icon name, optional
	ID      string // who asks for what, e.g. "qcrypt:keystore:/etc/blib/keys"
	Timeout time.Duration
	// AnswerUID may answer besides root (agents run as root by convention): the user
	// whose command led to the question. Negative: root only.
	AnswerUID int
}

// Ask puts the question and waits for the first answer from root or AnswerUID, until
// ctx ends or the timeout passes. The question is gone when Ask returns. The caller
// owns the returned password and clears it when done.
func Ask(ctx context.Context, q Question) ([]byte, error) {
	dir := q.Dir
	if dir == "" {
		dir = AskPasswordDir
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("cannot make %s: %w", dir, err)
	}
	id, err := randomName()
	if err != nil {
		return nil, err
	}
	sockPath := filepath.Join(dir, "sck."+id)
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sockPath, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("cannot make the answer socket: %w", err)
	}
	defer func() { _ = conn.Close(); _ = os.Remove(sockPath) }()
	if err := prepareAnswerSocket(conn, sockPath, q.AnswerUID); err != nil {
		return nil, err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var notAfter uint64
	if q.Timeout > 0 {
		var cancelTimeout context.CancelFunc
		ctx, cancelTimeout = context.WithTimeout(ctx, q.Timeout)
		defer cancelTimeout()
		notAfter = monotonicUsec() + uint64(q.Timeout/time.Microsecond)
	}
	askPath := filepath.Join(dir, "ask."+id)
	if err := writeQuestion(askPath, q, sockPath, notAfter); err != nil {
		return nil, err
	}
	defer func() { _ = os.Remove(askPath) }()

	go func() { <-ctx.Done(); _ = conn.SetReadDeadline(time.Now()) }()
	buf := make([]byte, 4096)
	defer clear(buf)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred))
	for {
		n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("no password given: %w", ctx.Err())
			}
			return nil, fmt.Errorf("cannot read the answer: %w", err)
		}
		if !allowedSender(oob[:oobn], q.AnswerUID) || n == 0 {
			continue // not an agent that may answer; wait for one that may
		}
		answer := bytes.TrimSuffix(buf[1:n], []byte{0})
		switch buf[0] {
		case '+':
			return append([]byte(nil), answer...), nil
		case '-':
			return nil, ErrPasswordDeclined
		}
	}
}

// prepareAnswerSocket makes the kernel report each sender's credentials and lets only
// root and the answering user send.
func prepareAnswerSocket(conn *net.UnixConn, path string, uid int) error {
	raw, err := conn.SyscallConn()
	if err != nil {
		return fmt.Errorf("cannot set up the answer socket: %w", err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) }); err != nil {
		serr = err
	}
	if serr != nil {
		return fmt.Errorf("cannot ask for the senders' credentials: %w", serr)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		return fmt.Errorf("cannot restrict the answer socket: %w", err)
	}
	if uid > 0 {
		if err := os.Lchown(path, uid, -1); err != nil {
			return fmt.Errorf("cannot let uid %d answer: %w", uid, err)
		}
	}
	return nil
}

func allowedSender(oob []byte, uid int) bool {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return false
	}
	for _, m := range msgs {
		if cred, err := unix.ParseUnixCredentials(&m); err == nil {
			return cred.Uid == 0 || uid >= 0 && cred.Uid == uint32(uid)
		}
	}
	return false
}

// writeQuestion writes the ask file whole (a temporary file renamed into place), since
// agents read it as soon as it appears.
func writeQuestion(path string, q Question, socket string, notAfter uint64) error {
	var b strings.Builder
	fmt.Fprintf(&b, "[Ask]\nPID=%d\nSocket=%s\nAcceptCached=0\nEcho=0\nNotAfter=%d\nMessage=%s\n",
		os.Getpid(), socket, notAfter, oneLine(q.Message))
	if q.Icon != "" {
		fmt.Fprintf(&b, "Icon=%s\n", oneLine(q.Icon))
	}
	if q.ID != "" {
		fmt.Fprintf(&b, "Id=%s\n", oneLine(q.ID))
	}
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("cannot write the question: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("cannot put the question: %w", err)
	}
	return nil
}

// oneLine keeps an ini value on its line.
func oneLine(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
}

func randomName() (string, error) {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("cannot name the question: %w", err)
	}
	return hex.EncodeToString(b), nil
}

func monotonicUsec() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts) // cannot fail for this clock
	return uint64(ts.Nano() / 1000)
}

// PasswordRequest is a question an agent found.
type PasswordRequest struct {
	Path, Socket, Message, Icon, ID string
	PID                             int
	Owner                           uint32 // who wrote the ask file: root in AskPasswordDir
}

// PendingPasswordRequests lists the questions in dir (AskPasswordDir when empty) that
// are still asked: the asker runs and NotAfter has not passed. Files that do not parse,
// or whose socket is not in dir, are skipped.
func PendingPasswordRequests(dir string) ([]PasswordRequest, error) {
	if dir == "" {
		dir = AskPasswordDir
	}
	paths, err := filepath.Glob(filepath.Join(dir, "ask.*"))
	if err != nil {
		return nil, fmt.Errorf("cannot list %s: %w", dir, err)
	}
	var out []PasswordRequest
	for _, p := range paths {
		if r, ok := readRequest(dir, p); ok {
			out = append(out, r)
		}
	}
	return out, nil
}

func readRequest(dir, path string) (PasswordRequest, bool) {
	f, err := os.Open(path)
	if err != nil {
		return PasswordRequest{}, false
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil || !info.Mode().IsRegular() {
		return PasswordRequest{}, false
	}
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return PasswordRequest{}, false
	}
	r := PasswordRequest{Path: path, Owner: st.Uid}
	var notAfter uint64
	section := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(line, "[") {
			section = line
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || section != "[Ask]" {
			continue
		}
		switch k {
		case "PID":
			r.PID, _ = strconv.Atoi(v)
		case "Socket":
			r.Socket = v
		case "Message":
			r.Message = v
		case "Icon":
			r.Icon = v
		case "Id":
			r.ID = v
		case "NotAfter":
			notAfter, _ = strconv.ParseUint(v, 10, 64)
		}
	}
	if sc.Err() != nil || r.PID <= 0 || filepath.Dir(r.Socket) != filepath.Clean(dir) {
		return PasswordRequest{}, false
	}
	if notAfter != 0 && monotonicUsec() > notAfter {
		return PasswordRequest{}, false
	}
	if err := unix.Kill(r.PID, 0); errors.Is(err, unix.ESRCH) {
		return PasswordRequest{}, false
	}
	return r, true
}

// WaitPasswordRequest waits until the question with Id id is asked in dir
// (AskPasswordDir when empty), or ctx ends. Agents are told of new files by inotify;
// a look every 50 ms serves the one question waited for as well.
func WaitPasswordRequest(ctx context.Context, dir, id string) (PasswordRequest, error) {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		reqs, err := PendingPasswordRequests(dir)
		if err != nil {
			return PasswordRequest{}, err
		}
		for _, r := range reqs {
			if r.ID == id {
				return r, nil
			}
		}
		select {
		case <-ctx.Done():
			return PasswordRequest{}, ctx.Err()
		case <-tick.C:
		}
	}
}

// Answer sends the password to the asker.
func (r PasswordRequest) Answer(password []byte) error {
	msg := make([]byte, 0, len(password)+1)
	msg = append(append(msg, '+'), password...)
	defer clear(msg)
	return r.send(msg)
}

// Decline tells the asker that the user declined.
func (r PasswordRequest) Decline() error { return r.send([]byte{'-'}) }

func (r PasswordRequest) send(msg []byte) error {
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: r.Socket, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("cannot reach the asker of %q: %w", r.Message, err)
	}
	defer conn.Close()
	if _, err := conn.Write(msg); err != nil {
		return fmt.Errorf("cannot answer %q: %w", r.Message, err)
	}
	return nil
}
