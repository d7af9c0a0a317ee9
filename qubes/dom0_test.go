package qubes

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// LocalDom0 hands files to its script as descriptors 3, 4, ...: how luks-init's build
// reaches a work file the caller opened, without qcryptd opening a path.
func TestLocalDom0PassesFiles(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	in := filepath.Join(dir, "in")
	if err := os.WriteFile(in, []byte("from the caller\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r, _ := os.Open(in)
	defer r.Close()
	w, _ := os.CreateTemp(dir, "work")
	defer w.Close()
	os.Remove(w.Name()) // unlinked, as qcryptctl's work file is
	d := LocalDom0{Runner: NewRunner([]string{"unused"})}
	res, err := d.Run(context.Background(), "cat /dev/fd/3; echo written > /dev/fd/4", strings.NewReader(""), r, w)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("%v %+v", err, res)
	}
	if string(res.Stdout) != "from the caller\n" {
		t.Errorf("read %q", res.Stdout)
	}
	got := make([]byte, 8)
	if n, _ := w.ReadAt(got, 0); string(got[:n]) != "written\n" {
		t.Errorf("work file holds %q", got[:n])
	}
	if _, err := (RemoteDom0{}).Run(context.Background(), "true", nil, r); err == nil {
		t.Error("the simulated dom0 took a file it cannot pass")
	}
}
