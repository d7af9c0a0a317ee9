package qubes

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

// recorder is a run that records its keys, tells when it starts and waits for a release.
type recorder struct {
	mu      sync.Mutex
	runs    [][]string
	started chan []string
	release chan struct{}
	ctxs    chan context.Context
}

func newRecorder() *recorder {
	return &recorder{started: make(chan []string, 10), release: make(chan struct{}, 10), ctxs: make(chan context.Context, 10)}
}

func (r *recorder) run(ctx context.Context, keys []string) map[string]string {
	r.mu.Lock()
	r.runs = append(r.runs, slices.Clone(keys))
	n := len(r.runs)
	r.mu.Unlock()
	r.ctxs <- ctx
	r.started <- keys
	select {
	case <-r.release:
	case <-ctx.Done():
	}
	out := map[string]string{}
	for _, k := range keys {
		out[k] = k + "@" + string(rune('0'+n))
	}
	return out
}

// waitJoined waits until the next batch holds n callers.
func waitJoined[K comparable, R any](t *testing.T, b *Batcher[K, R], n int) {
	t.Helper()
	got := 0
	if !testkit.Within(time.Minute, func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		got = 0
		if b.next != nil {
			for _, c := range b.next.waiting {
				got += c
			}
		}
		return got == n
	}) {
		t.Fatalf("%d callers joined, want %d", got, n)
	}
}

// A request that arrives during a run is answered by the next run, shared by every
// request that arrived meanwhile, each key once.
func TestBatcherJoinsTheNextRun(t *testing.T) {
	t.Parallel()
	r := newRecorder()
	b := NewBatcher(r.run)
	first := make(chan string)
	go func() { v, _ := b.Do(context.Background(), "a"); first <- v }()
	if keys := <-r.started; !slices.Equal(keys, []string{"a"}) {
		t.Fatalf("first run %v", keys)
	}
	results := make(chan string, 3)
	for _, k := range []string{"a", "b", "a"} {
		go func() { v, _ := b.Do(context.Background(), k); results <- v }()
	}
	waitJoined(t, b, 3)
	r.release <- struct{}{}
	if v := <-first; v != "a@1" {
		t.Errorf("first answer %q", v)
	}
	if keys := <-r.started; !slices.Equal(slices.Sorted(slices.Values(keys)), []string{"a", "b"}) {
		t.Fatalf("second run %v, want a and b once", keys)
	}
	r.release <- struct{}{}
	var got []string
	for range 3 {
		got = append(got, <-results)
	}
	slices.Sort(got)
	if want := []string{"a@2", "a@2", "b@2"}; !slices.Equal(got, want) {
		t.Errorf("answers %v, want %v (none from the run that began before them)", got, want)
	}
	if len(r.runs) != 2 {
		t.Errorf("%d runs, want 2", len(r.runs))
	}
}

// A caller that gives up gets its context's error; the run goes on for the others and
// is canceled only when nobody waits for it.
func TestBatcherCallersGivingUp(t *testing.T) {
	t.Parallel()
	r := newRecorder()
	b := NewBatcher(r.run)
	ctx1, cancel1 := context.WithCancel(context.Background())
	ctx2, cancel2 := context.WithCancel(context.Background())
	errs := make(chan error, 2)
	go func() { _, err := b.Do(ctx1, "a"); errs <- err }()
	<-r.started
	runCtx := <-r.ctxs
	go func() { _, err := b.Do(ctx2, "b"); errs <- err }()
	waitJoined(t, b, 1)
	cancel2() // gives up before its run began: its key is dropped
	if err := <-errs; !errors.Is(err, context.Canceled) {
		t.Fatalf("second caller: %v", err)
	}
	if runCtx.Err() != nil {
		t.Fatal("the run was canceled while a caller still waited")
	}
	cancel1()
	if err := <-errs; !errors.Is(err, context.Canceled) {
		t.Fatalf("first caller: %v", err)
	}
	<-runCtx.Done() // nobody waits any more: the run is canceled
	// The next request starts a fresh run; "b" was never run.
	go func() { _, err := b.Do(context.Background(), "c"); errs <- err }()
	if keys := <-r.started; !slices.Equal(keys, []string{"c"}) {
		t.Fatalf("next run %v, want only c", keys)
	}
	r.release <- struct{}{}
	if err := <-errs; err != nil {
		t.Fatalf("caller of c: %v", err)
	}
	if len(r.runs) != 2 {
		t.Errorf("runs %v, want [a] [c]", r.runs)
	}
}
