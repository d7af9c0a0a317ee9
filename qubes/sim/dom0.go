package sim

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/qcrypt/qcrypt/qubes"
)

// Dom0 is the simulated dom0 for luks-init: scripts run in dom0's sandbox (with the fake
// block tools) and its files are read from dom0's tree.
type Dom0 struct {
	Runner *qubes.Runner
	Root   string
}

// Dom0 returns the simulated dom0 reached through runner.
func (s *Sim) Dom0(runner *qubes.Runner) Dom0 {
	vm, _ := s.VM("dom0")
	return Dom0{Runner: runner, Root: vm.root}
}

// Run runs a script in dom0's sandbox.
func (d Dom0) Run(ctx context.Context, script string, input io.Reader) (qubes.Result, error) {
	return d.Runner.Run(ctx, "dom0", script, input)
}

// Open opens a file of the simulated dom0.
func (d Dom0) Open(path string) (io.ReadCloser, error) {
	clean := filepath.Clean("/" + path)
	if strings.Contains(clean, "..") {
		return nil, os.ErrInvalid
	}
	return os.Open(filepath.Join(d.Root, clean))
}
