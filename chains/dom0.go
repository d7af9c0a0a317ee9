package chains

import (
	"context"
	"io"
	"os"

	"github.com/qcrypt/qcrypt/qubes"
)

// Dom0 is where luks-init builds a container: a runner for dom0 scripts and read access
// to the files they make (qubes.LocalDom0 in production, sim.Dom0 in the simulator).
// files become the script's descriptors 3, 4, ...
type Dom0 interface {
	Run(ctx context.Context, script string, input io.Reader, files ...*os.File) (qubes.Result, error)
	Open(path string) (io.ReadCloser, error)
}
