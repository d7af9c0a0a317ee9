package chains

import "io"

// Dom0 is where luks-init builds a container: a runner for dom0 scripts and read
// access to the files they make. In production it is dom0 itself; in the simulator,
// the simulated dom0.
type Dom0 interface {
	Run(script string, input io.Reader) (exitCode int, stdout []byte, err error)
	Open(path string) (io.ReadCloser, int64, error)
}
