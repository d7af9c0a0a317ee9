package chains

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/simtest"
)

// Every script the engine runs in a qube or in dom0 during this package's tests is
// recorded and, once the tests passed, checked with shellcheck as the bash it runs
// as: quoting mistakes in a script fed hostile names are what it finds.

var ranScripts sync.Map // script text → where it ran ("qube", "dom0")

func init() { simtest.AfterTests(shellcheckScripts) }

// checkedRunner records the scripts it runs in qubes.
type checkedRunner struct{ Runner }

func (r checkedRunner) Run(ctx context.Context, vm, script string, input io.Reader) (qubes.Result, error) {
	ranScripts.LoadOrStore(script, "qube")
	return r.Runner.Run(ctx, vm, script, input)
}

// checkedDom0 records the scripts it runs in dom0.
type checkedDom0 struct{ Dom0 }

func (d checkedDom0) Run(ctx context.Context, script string, input io.Reader, files ...*os.File) (qubes.Result, error) {
	ranScripts.LoadOrStore(script, "dom0")
	return d.Dom0.Run(ctx, script, input, files...)
}

// recordingDom0 only records: the key store's scripts, which need dom0's root. It
// counts the distinct scripts it saw.
type recordingDom0 struct{ seen map[string]bool }

func (d recordingDom0) Run(_ context.Context, script string, _ io.Reader, _ ...*os.File) (qubes.Result, error) {
	ranScripts.LoadOrStore(script, "dom0")
	d.seen[script] = true
	return qubes.Result{Stdout: []byte("1 1 1\n")}, nil
}
func (recordingDom0) Open(string) (io.ReadCloser, error) { return nil, os.ErrNotExist }

// TestKeystoreScriptsRecorded runs every key store operation against a dom0 that only
// records, so that their scripts are checked too.
func TestKeystoreScriptsRecorded(t *testing.T) {
	t.Parallel()
	d := recordingDom0{seen: map[string]bool{}}
	e := &Engine{Dom0: d}
	k := Keystore{Dir: "/home/u/qcrypt keys"}
	c := demoChain()
	_, _ = e.KeystoreStatus(bg, k)
	_ = e.KeystoreUnlock(bg, k, []byte("pw"))
	_ = e.KeystoreLock(bg, k)
	_, _ = e.KeystoreKey(bg, k, "work", "demo")
	_ = e.KeystoreAdd(bg, k, "demo", map[string][]byte{"mediator": []byte("a"), "work": []byte("b")})
	_ = e.KeystoreInit(bg, k, []byte("pw"))
	_ = e.keystoreCanTake(bg, k, c)
	// Its own count: other tests' dom0 scripts (luks-init's) are in ranScripts too.
	if n := len(d.seen); n != 7 {
		t.Errorf("%d distinct key store scripts ran, want the 7 operations'", n)
	}
}

// shellcheckScripts checks the recorded scripts in one run of shellcheck.
func shellcheckScripts() error {
	recorded := 0
	ranScripts.Range(func(_, _ any) bool { recorded++; return true })
	if recorded == 0 {
		return nil // a run of tests that ran no script (go test -run, a benchmark)
	}
	if _, err := exec.LookPath("shellcheck"); err != nil {
		if os.Getenv("QCRYPT_REQUIRE_SHELLCHECK") == "1" {
			return errors.New("shellcheck is missing (make deps)")
		}
		fmt.Println("skipping the scripts' shellcheck: shellcheck is not installed (make deps)")
		return nil
	}
	dir, err := os.MkdirTemp("", "qcrypt-scripts-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	var files []string
	ranScripts.Range(func(script, where any) bool {
		f := filepath.Join(dir, fmt.Sprintf("%s-%04d.sh", where, len(files)))
		files = append(files, f)
		err = os.WriteFile(f, []byte("#!/bin/bash\n"+script.(string)+"\n"), 0o600)
		return err == nil
	})
	if err != nil {
		return err
	}
	sort.Strings(files)
	var out bytes.Buffer
	// SC2174 (mkdir -p -m sets the mode of the last directory only) is what the key
	// store's scripts mean: the parents keep their modes.
	cmd := exec.Command("shellcheck", append([]string{"--shell=bash", "--severity=warning", "--exclude=SC2174", "--format=gcc"}, files...)...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		var report strings.Builder
		for _, line := range strings.SplitAfter(out.String(), "\n") {
			report.WriteString(line)
			if file, _, ok := strings.Cut(line, ":"); ok && strings.HasPrefix(file, dir) {
				if text, rerr := os.ReadFile(file); rerr == nil {
					fmt.Fprintf(&report, "  script:\n%s\n", text)
				}
			}
		}
		return fmt.Errorf("shellcheck found problems in %d scripts:\n%s", len(files), report.String())
	}
	fmt.Printf("shellcheck: %d scripts clean\n", len(files))
	return nil
}
