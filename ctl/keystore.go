package ctl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"

	"github.com/godbus/dbus/v5"
	"golang.org/x/sys/unix"

	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/systemd"
)

// cmdKeystore is qcryptctl keystore unlock|lock|status|init [DIR].
func cmdKeystore(a *app, p *parsed) error {
	if len(p.args) < 1 || len(p.args) > 2 || !slices.Contains([]string{"unlock", "lock", "status", "init"}, p.args[0]) {
		return usageErr("keystore needs unlock, lock, status or init, and at most the store's directory")
	}
	dir := ""
	if len(p.args) == 2 {
		dir = p.args[1]
	}
	asJSON := p.flags["--json"]
	api, err := a.client()
	if err != nil {
		return err
	}
	switch p.args[0] {
	case "lock":
		return a.job(api, api.KeystoreLock(dir), asJSON)
	case "unlock":
		return a.answeredJob(api, api.KeystoreUnlock(dir), false, asJSON)
	case "init":
		return a.answeredJob(api, api.KeystoreInit(dir), true, asJSON)
	}
	st, err := api.KeystoreStatus(a.ctx, dir)
	if err != nil {
		return err
	}
	if asJSON {
		a.printJSON(st)
		return nil
	}
	state := "no key store there"
	switch {
	case st.Unlocked:
		state = "unlocked"
	case st.Open:
		state = "open but not mounted for qcryptd (an unlock needs no password; a read mounts it)"
	case st.Exists:
		state = "locked"
	}
	fmt.Fprintf(a.out, "%s: %s\n", st.Dir, state)
	return nil
}

// answeredJob runs a job that asks for a password and answers the question qcryptd
// puts for it (and for no other job) with a password read from the user (twice, the
// same, with confirm: a new password), until the job ends.
func (a *app) answeredJob(api API, start dbusapi.Starter, confirm, asJSON bool) error {
	ctx, cancel := context.WithCancel(a.ctx)
	var wg sync.WaitGroup
	var answerErr error
	wrapped := func(jctx context.Context) (dbus.ObjectPath, error) {
		path, err := start(jctx)
		if id, ok := dbusapi.JobID(path); err == nil && ok {
			wg.Add(1)
			go func() {
				defer wg.Done()
				answerErr = a.answer(ctx, dbusapi.PasswordQuestionID(id), confirm)
			}()
		}
		return path, err
	}
	err := a.job(api, wrapped, asJSON)
	cancel()
	wg.Wait()
	if answerErr != nil {
		fmt.Fprintln(a.err, "qcryptctl:", answerErr)
	}
	return err
}

// answer waits for the question with id and answers it. Only root can put a question
// in systemd's directory; elsewhere (tests) the directory is the caller's.
func (a *app) answer(ctx context.Context, id string, confirm bool) error {
	r, err := systemd.WaitPasswordRequest(ctx, a.askDir, id)
	if err != nil {
		if ctx.Err() != nil {
			return nil // the job ended without a question (the store was open already)
		}
		return err
	}
	if a.askDir == systemd.AskPasswordDir && r.Owner != 0 {
		return fmt.Errorf("the password question %s is not root's: not answered", id)
	}
	password, err := a.password(ctx, dbusapi.Clean(r.Message)+": ")
	if err != nil {
		_ = r.Decline()
		return fmt.Errorf("cannot read the password: %w", err)
	}
	defer clear(password)
	if confirm {
		again, err := a.password(ctx, "Repeat it: ")
		same := err == nil && bytes.Equal(again, password)
		clear(again)
		if !same {
			_ = r.Decline()
			return errors.New("the two passwords differ (or the second could not be read): nothing was created")
		}
	}
	return r.Answer(password)
}

// readPassword reads one line from the terminal without echo, or from standard input
// when there is no terminal (a script piping it in). It gives up when ctx ends (the job
// ended), with the terminal's echo back on.
func readPassword(ctx context.Context, prompt string) ([]byte, error) {
	in := os.Stdin
	if tty, err := os.OpenFile("/dev/tty", os.O_RDWR, 0); err == nil {
		defer tty.Close()
		fd := int(tty.Fd())
		if old, err := unix.IoctlGetTermios(fd, unix.TCGETS); err == nil {
			quiet := *old
			quiet.Lflag &^= unix.ECHO
			if err := unix.IoctlSetTermios(fd, unix.TCSETS, &quiet); err != nil {
				return nil, fmt.Errorf("cannot turn the terminal's echo off: %w", err)
			}
			defer func() { _ = unix.IoctlSetTermios(fd, unix.TCSETS, old); fmt.Fprintln(tty) }()
			fmt.Fprint(tty, prompt)
			in = tty
		}
	}
	return readLine(ctx, int(in.Fd()))
}

// readLine reads up to a newline, a byte at a time so that nothing after it is taken
// from the descriptor, polling so that ctx can end the wait.
func readLine(ctx context.Context, fd int) ([]byte, error) {
	line := make([]byte, 0, 1024) // no reallocation leaves a copy behind
	one := make([]byte, 1)
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		if err := ctx.Err(); err != nil {
			clear(line)
			return nil, err
		}
		n, err := unix.Poll(fds, 200)
		if errors.Is(err, unix.EINTR) || err == nil && n == 0 {
			continue
		}
		if err != nil {
			return nil, err
		}
		k, err := unix.Read(fd, one)
		switch {
		case errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			clear(line)
			return nil, err
		case k == 1 && one[0] != '\n':
			line = append(line, one[0])
			continue
		}
		// A newline, or the end of the input.
		line = bytes.TrimSuffix(line, []byte{'\r'})
		if len(line) == 0 {
			return nil, errors.New("an empty password")
		}
		return line, nil
	}
}

// sortedValues lists a map's distinct values in order.
func sortedValues(m map[string]string) []string {
	var out []string
	for _, v := range m {
		if !slices.Contains(out, v) {
			out = append(out, v)
		}
	}
	slices.Sort(out)
	return out
}
