package cli

import (
	"testing"

	"github.com/qcrypt/qcrypt/chains/golden"
)

// docs/qcryptd.md and qcryptd(8) are made from the flags Main parses.
func TestDocs(t *testing.T) {
	golden.Check(t, "../../../docs/qcryptd.md", Markdown())
	golden.Check(t, "../../../docs/man/qcryptd.8", ManPage())
}
