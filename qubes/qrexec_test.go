package qubes

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

// At most MaxParallel calls run at once; the others wait for a slot, and a waiting call
// whose context ends gives up without running.
func TestRunnerMaxParallel(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	release := filepath.Join(dir, "release")
	// The fake qrexec-client marks itself running, then waits for the release file.
	fake := `f=$(mktemp -p "$0/running"); while [ ! -e "$0/release" ]; do sleep 0.01; done; rm "$f"; cat >/dev/null`
	if err := os.Mkdir(filepath.Join(dir, "running"), 0o755); err != nil {
		t.Fatal(err)
	}
	r := NewRunner([]string{"/bin/sh", "-c", fake, dir})
	r.MaxParallel = 2
	running := func() int {
		e, _ := os.ReadDir(filepath.Join(dir, "running"))
		return len(e)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 5)
	for i := 0; i < 5; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := r.Run(context.Background(), "work", "true", nil)
			errs <- err
		}()
	}
	testkit.Eventually(t, "two calls run and three wait", time.Minute, func() bool { return running() == 2 && r.Waiting() == 3 })
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := r.Run(ctx, "work", "true", nil); err == nil {
		t.Error("a call whose context ended while waiting ran anyway")
	}
	if n := running(); n != 2 {
		t.Errorf("%d calls run at once, want 2", n)
	}
	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	if r.Spawns() != 5 {
		t.Errorf("%d processes, want 5", r.Spawns())
	}
}
