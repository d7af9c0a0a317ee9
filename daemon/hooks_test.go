package daemon

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

// detached is a hook's start that runs sleep for seconds in a session of its own and
// goes on once it runs.
func detached(dir, seconds string) string {
	up := filepath.Join(dir, "up-"+seconds)
	return "setsid sh -c 'touch " + up + "; exec sleep " + seconds + "' & while [ ! -e " + up + " ]; do sleep 0.01; done; "
}

// gone checks, for a while, that no process runs sleep with these seconds.
func gone(seconds string) func(t *testing.T) {
	return func(t *testing.T) {
		t.Helper()
		deadline := time.Now().Add(time.Minute)
		for {
			found := ""
			procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
			for _, p := range procs {
				if b, err := os.ReadFile(p); err == nil && string(b) == "sleep\x00"+seconds+"\x00" {
					found = p
				}
			}
			if found == "" {
				return
			}
			if time.Now().After(deadline) {
				pid := strings.Split(found, "/")[2]
				_ = exec.Command("kill", "-9", pid).Run()
				t.Fatalf("a process the hook started still runs: %s", found)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

func TestHookRunner(t *testing.T) {
	// qcryptd's own environment under systemd: none of it may reach a hook.
	t.Setenv("NOTIFY_SOCKET", "/run/systemd/notify")
	t.Setenv("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/x")
	dir := t.TempDir()
	tests := map[string]struct {
		command string
		wantErr string // "" = success
		check   func(t *testing.T)
	}{
		"clean environment": {command: "env > " + dir + "/env", check: func(t *testing.T) {
			env, _ := os.ReadFile(filepath.Join(dir, "env"))
			for _, bad := range []string{"NOTIFY_SOCKET", "DBUS_SYSTEM_BUS_ADDRESS"} {
				if strings.Contains(string(env), bad) {
					t.Errorf("%s reached the hook:\n%s", bad, env)
				}
			}
			if !strings.Contains(string(env), "QCRYPT_CHAIN=demo") || !strings.Contains(string(env), "PATH=/usr/local/sbin") {
				t.Errorf("hook environment:\n%s", env)
			}
		}},
		"a failure says why": {command: "echo no space; exit 3", wantErr: "exit status 3: no space"},
		"output is bounded":  {command: "head -c 10000000 /dev/zero | tr '\\0' x; exit 1", wantErr: "exit status 1: xxx", check: nil},
		// The whole process group goes, not only the shell.
		"timeout kills it all": {command: "sleep 600 & sleep 600; wait", wantErr: "timed out after 300ms"},
		// So does a process that left the group and the session.
		"timeout kills what left its session": {command: detached(dir, "987651") + "sleep 600; wait", wantErr: "timed out after 300ms",
			check: gone("987651")},
		"an ended hook leaves nothing running": {command: detached(dir, "987652") + "echo started", check: gone("987652")},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			timeout := time.Minute
			if strings.HasPrefix(tc.wantErr, "timed out") {
				timeout = 300 * time.Millisecond
			}
			run := hookRunner(timeout, logrus.NewEntry(logrus.New()))
			done := make(chan error, 1)
			go func() { done <- run(context.Background(), tc.command, []string{"QCRYPT_CHAIN=demo"}) }()
			var err error
			select {
			case err = <-done:
			case <-time.After(2 * time.Minute):
				t.Fatal("the hook was not stopped")
			}
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Fatalf("got %v, want %q", err, tc.wantErr)
			}
			if err != nil && len(err.Error()) > 400 {
				t.Errorf("error of %d bytes: output is not bounded", len(err.Error()))
			}
			if tc.check != nil {
				tc.check(t)
			}
		})
	}
}
