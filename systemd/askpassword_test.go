package systemd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// askerEnv makes the test binary a helper: "agent" answers the first question it
// finds in AskPasswordDir with the password in QCRYPT_TEST_PASSWORD; "send" sends
// "+"+QCRYPT_TEST_PASSWORD to the socket QCRYPT_TEST_SOCKET (as whatever user it runs as).
const askerEnv = "QCRYPT_TEST_ASKPASS"

func TestMain(m *testing.M) {
	switch os.Getenv(askerEnv) {
	case "agent":
		deadline := time.Now().Add(time.Minute)
		for time.Now().Before(deadline) {
			reqs, err := PendingPasswordRequests("")
			if err == nil && len(reqs) > 0 {
				if err := reqs[0].Answer([]byte(os.Getenv("QCRYPT_TEST_PASSWORD"))); err != nil {
					fmt.Fprintln(os.Stderr, err)
					os.Exit(1)
				}
				os.Exit(0)
			}
			time.Sleep(20 * time.Millisecond)
		}
		fmt.Fprintln(os.Stderr, "no question came")
		os.Exit(1)
	case "send":
		r := PasswordRequest{Socket: os.Getenv("QCRYPT_TEST_SOCKET")}
		if err := r.Answer([]byte(os.Getenv("QCRYPT_TEST_PASSWORD"))); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// question waits until the question with id is in dir (an agent's view of it).
func question(t *testing.T, dir, id string) PasswordRequest {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := WaitPasswordRequest(ctx, dir, id)
	if err != nil {
		t.Fatalf("question %s: %v", id, err)
	}
	return r
}

type asked struct {
	password []byte
	err      error
}

func ask(ctx context.Context, q Question) <-chan asked {
	out := make(chan asked, 1)
	go func() {
		p, err := Ask(ctx, q)
		out <- asked{p, err}
	}()
	return out
}

// The asker and the agent side of the protocol against each other: the question is
// found with its fields, an answer or a decline reaches the asker, a question whose
// asker gave up is gone with its socket.
func TestAskPassword(t *testing.T) {
	tests := map[string]struct {
		answer  func(r PasswordRequest) error
		cancel  bool
		want    string
		wantErr error
	}{
		"answered": {answer: func(r PasswordRequest) error { return r.Answer([]byte("pass word\x00")) }, want: "pass word"},
		"declined": {answer: func(r PasswordRequest) error { return r.Decline() }, wantErr: ErrPasswordDeclined},
		"given up": {cancel: true, wantErr: context.Canceled},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			got := ask(ctx, Question{Dir: dir, Message: "Password for the key store\n/etc/blib/keys", Icon: "drive-harddisk",
				ID: "qcrypt:test", AnswerUID: -1})
			r := question(t, dir, "qcrypt:test")
			if r.Message != "Password for the key store /etc/blib/keys" || r.Icon != "drive-harddisk" || r.PID != os.Getpid() {
				t.Errorf("question as an agent reads it: %+v", r)
			}
			if tc.cancel {
				cancel()
			} else if err := tc.answer(r); err != nil {
				t.Fatal(err)
			}
			res := <-got
			if string(res.password) != tc.want || !errors.Is(res.err, tc.wantErr) {
				t.Errorf("Ask: %q %v, want %q %v", res.password, res.err, tc.want, tc.wantErr)
			}
			if left, _ := filepath.Glob(filepath.Join(dir, "*")); len(left) != 0 {
				t.Errorf("left in the directory: %v", left)
			}
		})
	}
}

// A question with a timeout is skipped by agents once it passed and ends the ask.
func TestAskPasswordTimeout(t *testing.T) {
	dir := t.TempDir()
	start := time.Now()
	_, err := Ask(context.Background(), Question{Dir: dir, Message: "m", ID: "t", Timeout: 200 * time.Millisecond, AnswerUID: -1})
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) < 200*time.Millisecond {
		t.Errorf("got %v after %v", err, time.Since(start))
	}
	// An ask file left behind with a past NotAfter is not pending.
	stale := "[Ask]\nPID=" + fmt.Sprint(os.Getpid()) + "\nSocket=" + filepath.Join(dir, "sck.x") + "\nNotAfter=1\nMessage=old\n"
	if err := os.WriteFile(filepath.Join(dir, "ask.x"), []byte(stale), 0o644); err != nil {
		t.Fatal(err)
	}
	// So is one whose socket is outside the directory, or whose asker is gone.
	outside := "[Ask]\nPID=" + fmt.Sprint(os.Getpid()) + "\nSocket=/tmp/elsewhere\nNotAfter=0\nMessage=x\n"
	if err := os.WriteFile(filepath.Join(dir, "ask.y"), []byte(outside), 0o644); err != nil {
		t.Fatal(err)
	}
	if reqs, err := PendingPasswordRequests(dir); err != nil || len(reqs) != 0 {
		t.Errorf("pending: %+v %v", reqs, err)
	}
}

// Only root and the user the question is for may answer: another user can neither
// write to the socket nor, were it open, be believed. Needs root (other uids).
func TestAskPasswordAnswerers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to answer as other users")
	}
	// Other users reach the helper binary and the question only in directories they
	// may enter (t.TempDir's parents are private).
	open, err := os.MkdirTemp("", "qcrypt-askpass-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(open) })
	if err := os.Chmod(open, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	helper := filepath.Join(open, "helper")
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(helper, data, 0o755); err != nil {
		t.Fatal(err)
	}
	send := func(uid uint32, socket, password string) error {
		cmd := exec.Command(helper)
		cmd.Env = append(os.Environ(), askerEnv+"=send", "QCRYPT_TEST_SOCKET="+socket, "QCRYPT_TEST_PASSWORD="+password)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%w: %s", err, out)
		}
		return nil
	}
	dir := filepath.Join(open, "ask-password")
	const user, other = 60123, 60124
	got := ask(context.Background(), Question{Dir: dir, Message: "m", ID: "who", AnswerUID: user})
	r := question(t, dir, "who")
	if err := send(other, r.Socket, "from another user"); err == nil {
		t.Error("another user could write to the answer socket")
	}
	// Behind the socket's mode, the sender's credentials decide: opened to everyone,
	// another user's answer arrives first and is ignored.
	if err := os.Chmod(r.Socket, 0o666); err != nil {
		t.Fatal(err)
	}
	if err := send(other, r.Socket, "from another user"); err != nil {
		t.Fatal(err)
	}
	if err := send(user, r.Socket, "from the user"); err != nil {
		t.Fatal(err)
	}
	if res := <-got; string(res.password) != "from the user" || res.err != nil {
		t.Errorf("Ask: %q %v", res.password, res.err)
	}
}

// The protocol as systemd speaks it: its tty agent lists our question, and our agent
// answers systemd-ask-password. Both run in a mount namespace (bwrap) where a test
// directory is /run/systemd/ask-password, so no agent of this machine sees them.
func TestAskPasswordWithSystemdTools(t *testing.T) {
	for _, tool := range []string{"bwrap", "systemd-ask-password", "systemd-tty-ask-password-agent"} {
		need(t, tool)
	}
	if os.Geteuid() != 0 {
		t.Skip("systemd-ask-password and its agents are for root")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	inNamespace := func(args ...string) *exec.Cmd {
		return exec.Command("bwrap", append([]string{"--dev-bind", "/", "/", "--bind", dir, AskPasswordDir, "--"}, args...)...)
	}
	t.Run("systemd lists ours", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		got := ask(ctx, Question{Dir: dir, Message: "Password for the qcrypt key store /etc/blib/keys", ID: "qcrypt:list", AnswerUID: -1})
		question(t, dir, "qcrypt:list")
		out, err := inNamespace("systemd-tty-ask-password-agent", "--list").CombinedOutput()
		if err != nil || !strings.Contains(string(out), "Password for the qcrypt key store /etc/blib/keys") {
			t.Errorf("systemd-tty-ask-password-agent --list: %v\n%s", err, out)
		}
		cancel()
		<-got
	})
	t.Run("ours answers systemd", func(t *testing.T) {
		script := `"$1" & agent=$!; systemd-ask-password --no-tty --timeout=60 "qcrypt test question"; r=$?; wait $agent; exit $r`
		cmd := inNamespace("sh", "-c", script, "sh", self)
		cmd.Env = append(os.Environ(), askerEnv+"=agent", "QCRYPT_TEST_PASSWORD=s3cret pass")
		out, err := cmd.Output()
		if err != nil || string(out) != "s3cret pass\n" {
			t.Errorf("systemd-ask-password answered by our agent: %q %v", out, err)
		}
	})
}
