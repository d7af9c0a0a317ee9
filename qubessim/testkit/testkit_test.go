package testkit

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestDiff(t *testing.T) {
	for _, tc := range []struct{ name, a, b, want string }{
		{"same", "x\ny", "x\ny", ""},
		{"changed line", "1\n2\n3\n4\n5\n6\n7\n8", "1\n2\n3\n4\nfive\n6\n7\n8",
			"...\n  3\n  4\n- 5\n+ five\n  6\n  7\n...\n"},
		{"added at end", "a\nb", "a\nb\nc", "  a\n  b\n+ c\n"},
		{"removed at start", "a\nb\nc\nd\ne", "b\nc\nd\ne", "- a\n  b\n  c\n...\n"},
		{"two changes apart", "1\n2\n3\n4\n5\n6\n7\n8\n9", "one\n2\n3\n4\n5\n6\n7\n8\nnine",
			"- 1\n+ one\n  2\n  3\n...\n  7\n  8\n- 9\n+ nine\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Diff(tc.a, tc.b); got != tc.want {
				t.Errorf("Diff =\n%s\nwant\n%s", got, tc.want)
			}
		})
	}
}

// fakeT records what Golden reports instead of failing the test.
type fakeT struct {
	testing.TB
	errors []string
}

func (f *fakeT) Helper() {}
func (f *fakeT) Errorf(format string, args ...any) {
	f.errors = append(f.errors, format)
}

func TestGoldenReportsAndUpdates(t *testing.T) {
	path := filepath.Join(t.TempDir(), "out.txt")
	if err := os.WriteFile(path, []byte("a\nb\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	f := &fakeT{TB: t}
	Golden(f, path, "a\nb\n")
	if len(f.errors) != 0 {
		t.Fatalf("equal output reported: %v", f.errors)
	}
	Golden(f, path, "a\nc\n")
	if len(f.errors) != 1 {
		t.Fatalf("a difference was not reported")
	}
	t.Setenv(UpdateEnv, "1")
	Golden(f, path, "a\nc\n")
	if data, _ := os.ReadFile(path); string(data) != "a\nc\n" || len(f.errors) != 1 {
		t.Fatalf("update wrote %q, reported %v", data, f.errors)
	}
}

func TestWithin(t *testing.T) {
	n := 0
	if !Within(time.Minute, func() bool { n++; return n == 3 }) {
		t.Fatal("a condition that became true was not seen")
	}
	if Within(20*time.Millisecond, func() bool { return false }) {
		t.Fatal("a condition that never held was reported true")
	}
}
