// Package testkit is the test equipment every package's tests share: golden files
// (CLI output, check reports, introspection, generated docs) and waiting for a
// condition. It lives with the simulator, the project's other test equipment; it
// imports nothing of it.
package testkit

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// UpdateEnv names the environment variable that makes Golden rewrite its files.
const UpdateEnv = "TESTS_UPDATE_GOLDEN"

// Golden fails t unless got equals the content of the file at path, showing the lines
// that differ. With TESTS_UPDATE_GOLDEN=1 it writes got to the file first.
func Golden(t testing.TB, path, got string) {
	t.Helper()
	if os.Getenv(UpdateEnv) == "1" {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with %s=1 to create it)", err, UpdateEnv)
	}
	if got != string(want) {
		t.Errorf("output differs from %s (- file, + got; %s=1 accepts it):\n%s", path, UpdateEnv, Diff(string(want), got))
	}
}

// Diff shows the lines of a and b that differ, with two lines of context: "-" for a,
// "+" for b, as diff -u does (without its headers).
func Diff(a, b string) string {
	x, y := strings.Split(a, "\n"), strings.Split(b, "\n")
	// lcs[i][j]: the longest common subsequence of x[i:] and y[j:].
	lcs := make([][]int, len(x)+1)
	for i := range lcs {
		lcs[i] = make([]int, len(y)+1)
	}
	for i := len(x) - 1; i >= 0; i-- {
		for j := len(y) - 1; j >= 0; j-- {
			if x[i] == y[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	type line struct {
		op   byte
		text string
	}
	var lines []line
	i, j := 0, 0
	for i < len(x) || j < len(y) {
		switch {
		case i < len(x) && j < len(y) && x[i] == y[j]:
			lines = append(lines, line{' ', x[i]})
			i, j = i+1, j+1
		case i < len(x) && (j == len(y) || lcs[i+1][j] >= lcs[i][j+1]):
			lines = append(lines, line{'-', x[i]})
			i++
		default:
			lines = append(lines, line{'+', y[j]})
			j++
		}
	}
	// Show every changed line and two lines of context around each; "..." where
	// lines are left out.
	const context = 2
	show := make([]bool, len(lines))
	for k, l := range lines {
		if l.op != ' ' {
			for c := max(k-context, 0); c <= min(k+context, len(lines)-1); c++ {
				show[c] = true
			}
		}
	}
	var out strings.Builder
	gap := false
	for k, l := range lines {
		if !show[k] {
			gap = true
			continue
		}
		if gap {
			out.WriteString("...\n")
			gap = false
		}
		fmt.Fprintf(&out, "%c %s\n", l.op, l.text)
	}
	if gap && out.Len() > 0 {
		out.WriteString("...\n")
	}
	return out.String()
}

// Within reports whether ok became true before d passed. It looks soon, then less
// often (up to every 100 ms), so a cheap condition is seen at once and a costly one
// (a bus call, a process) is not asked in a tight loop.
func Within(d time.Duration, ok func() bool) bool {
	deadline := time.Now().Add(d)
	pause := 5 * time.Millisecond
	for !ok() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(pause)
		pause = min(2*pause, 100*time.Millisecond)
	}
	return true
}

// Eventually fails t unless ok becomes true before d passed; what says what was
// waited for.
func Eventually(t testing.TB, what string, d time.Duration, ok func() bool) {
	t.Helper()
	if !Within(d, ok) {
		t.Fatalf("timed out after %v waiting until %s", d, what)
	}
}
