package ctl

import (
	"bytes"
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/systemd"
)

// unlockingAPI acts as qcryptd for a key store unlock: its job puts the password
// question of job 3 with systemd's protocol, in a test directory, and succeeds with
// the right password.
type unlockingAPI struct {
	fakeAPI
	dir string
}

func (u *unlockingAPI) RunJob(ctx context.Context, start dbusapi.Starter, _ func(dbusapi.JobInfo)) (dbusapi.JobResult, error) {
	if _, err := start(ctx); err != nil {
		return dbusapi.JobResult{}, err
	}
	password, err := systemd.Ask(ctx, systemd.Question{Dir: u.dir, Message: "Password for the qcrypt key store /srv/keys",
		ID: dbusapi.PasswordQuestionID(3), Timeout: time.Minute, AnswerUID: -1})
	switch {
	case err != nil:
		return dbusapi.JobResult{Message: err.Error()}, nil
	case string(password) != "s3cret":
		return dbusapi.JobResult{Message: "wrong password for the key store"}, nil
	}
	return dbusapi.JobResult{Success: true, Message: "unlocked"}, nil
}

// keystore unlock answers the question of its own job, with the password read from the
// user after a prompt naming the store, and no other question.
func TestKeystoreUnlockAnswersItsQuestion(t *testing.T) {
	dir := t.TempDir()
	api := &unlockingAPI{dir: dir}
	// Another job's question is there too: it must stay unanswered.
	other, cancelOther := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var otherErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, otherErr = systemd.Ask(other, systemd.Question{Dir: dir, Message: "another", ID: dbusapi.PasswordQuestionID(99), AnswerUID: -1})
	}()
	for _, tc := range []struct {
		password, out string
		code          int
	}{{"s3cret", "unlocked\n", 0}, {"wrong", "", ExitFailed}} {
		var out, errb bytes.Buffer
		var prompts []string
		a := &app{out: &out, err: &errb, ctx: context.Background(), askDir: dir,
			connect: func() (API, error) { return api, nil },
			password: func(_ context.Context, prompt string) ([]byte, error) {
				prompts = append(prompts, prompt)
				return []byte(tc.password), nil
			}}
		if code := a.main([]string{"keystore", "unlock", "/srv/keys"}); code != tc.code || out.String() != tc.out {
			t.Errorf("%s: exit %d %q %q", tc.password, code, out.String(), errb.String())
		}
		if len(prompts) != 1 || !strings.Contains(prompts[0], "/srv/keys") {
			t.Errorf("%s: prompts %q", tc.password, prompts)
		}
		if got := api.calls[len(api.calls)-1]; got != "KeystoreUnlock /srv/keys" {
			t.Errorf("call %q", got)
		}
	}
	cancelOther()
	wg.Wait()
	if !errors.Is(otherErr, context.Canceled) {
		t.Errorf("another job's question: %v, want it unanswered", otherErr)
	}
}

// A password read from a pipe (no terminal) ends at the newline and leaves the rest; an
// ended wait gives up.
func TestReadLine(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := w.WriteString("pass word\r\nnext\n"); err != nil {
		t.Fatal(err)
	}
	got, err := readLine(context.Background(), int(r.Fd()))
	if err != nil || string(got) != "pass word" {
		t.Errorf("got %q %v", got, err)
	}
	if got, err := readLine(context.Background(), int(r.Fd())); err != nil || string(got) != "next" {
		t.Errorf("second line %q %v", got, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := readLine(ctx, int(r.Fd())); !errors.Is(err, context.Canceled) {
		t.Errorf("an ended wait: %v", err)
	}
	w.Close()
	if _, err := readLine(context.Background(), int(r.Fd())); err == nil {
		t.Error("an empty line at the end was taken as a password")
	}
}

// keystore init asks for the new password twice and answers only when both agree; else
// it declines, and qcryptd creates nothing.
func TestKeystoreInitConfirmsThePassword(t *testing.T) {
	for _, tc := range []struct {
		second string
		code   int
	}{{"s3cret", 0}, {"other", ExitFailed}} {
		api := &unlockingAPI{dir: t.TempDir()}
		var out, errb bytes.Buffer
		answers := []string{"s3cret", tc.second}
		a := &app{out: &out, err: &errb, ctx: context.Background(), askDir: api.dir,
			connect: func() (API, error) { return api, nil },
			password: func(context.Context, string) ([]byte, error) {
				p := answers[0]
				answers = answers[1:]
				return []byte(p), nil
			}}
		code := a.main([]string{"keystore", "init", "/srv/keys"})
		if code != tc.code || len(answers) != 0 {
			t.Errorf("second %q: exit %d, %d answers unread, %q %q", tc.second, code, len(answers), out.String(), errb.String())
		}
		if tc.code != 0 && !strings.Contains(errb.String(), "differ") {
			t.Errorf("second %q: %q", tc.second, errb.String())
		}
	}
}
