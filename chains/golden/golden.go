// Package golden compares test output with golden files (CLI output, check reports,
// introspection, generated docs). TESTS_UPDATE_GOLDEN=1 rewrites the files instead.
package golden

import (
	"os"
	"path/filepath"
	"testing"
)

// Check fails t unless got equals the content of the file at path.
func Check(t testing.TB, path, got string) {
	t.Helper()
	if os.Getenv("TESTS_UPDATE_GOLDEN") == "1" {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with TESTS_UPDATE_GOLDEN=1 to create it)", err)
	}
	if got != string(want) {
		t.Errorf("output differs from %s:\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}
