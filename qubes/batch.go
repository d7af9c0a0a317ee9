package qubes

import (
	"context"
	"sync"
)

// Batcher serves concurrent requests with as few runs as possible, and never with a
// stale answer: a request that arrives while a run is under way waits for it and joins
// the next run, with every other request that arrived meanwhile. So each answer comes
// from a run that began after its request (a group commit). Runs never overlap.
//
// A run does not belong to any one caller: it has its own context, canceled when every
// caller waiting for it has given up.
type Batcher[K comparable, R any] struct {
	run func(ctx context.Context, keys []K) map[K]R

	mu      sync.Mutex
	running bool
	next    *batch[K, R]
}

type batch[K comparable, R any] struct {
	keys    []K
	waiting map[K]int // callers per key
	started bool
	cancel  context.CancelFunc
	done    chan struct{}
	res     map[K]R
}

// NewBatcher returns a Batcher whose runs call run with the distinct keys requested;
// run answers each (a missing key answers the zero R).
func NewBatcher[K comparable, R any](run func(ctx context.Context, keys []K) map[K]R) *Batcher[K, R] {
	return &Batcher[K, R]{run: run}
}

// Do requests key and waits for the run that answers it, or for ctx.
func (b *Batcher[K, R]) Do(ctx context.Context, key K) (R, error) {
	b.mu.Lock()
	if b.next == nil {
		b.next = &batch[K, R]{waiting: map[K]int{}, done: make(chan struct{})}
	}
	n := b.next
	if n.waiting[key] == 0 {
		n.keys = append(n.keys, key)
	}
	n.waiting[key]++
	if !b.running {
		b.running = true
		go b.loop()
	}
	b.mu.Unlock()

	select {
	case <-n.done:
		return n.res[key], nil
	case <-ctx.Done():
		b.leave(n, key)
		var zero R
		return zero, ctx.Err()
	}
}

// leave withdraws a caller that gave up: a key nobody waits for is dropped from a run
// not yet started, and a started run nobody waits for is canceled.
func (b *Batcher[K, R]) leave(n *batch[K, R], key K) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n.waiting[key]--
	if n.waiting[key] > 0 {
		return
	}
	delete(n.waiting, key)
	if !n.started {
		for i, k := range n.keys {
			if k == key {
				n.keys = append(n.keys[:i:i], n.keys[i+1:]...)
				break
			}
		}
	} else if len(n.waiting) == 0 {
		n.cancel()
	}
}

func (b *Batcher[K, R]) loop() {
	for {
		b.mu.Lock()
		n := b.next
		if n == nil {
			b.running = false
			b.mu.Unlock()
			return
		}
		b.next = nil
		ctx, cancel := context.WithCancel(context.Background())
		n.started, n.cancel = true, cancel
		keys := n.keys
		b.mu.Unlock()
		if len(keys) > 0 {
			n.res = b.run(ctx, keys)
		}
		cancel()
		close(n.done)
	}
}
