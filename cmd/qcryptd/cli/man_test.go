package cli

import (
	"testing"

	"github.com/qcrypt/qcrypt/qubessim/testkit"
)

// docs/qcryptd.md and qcryptd(8) are made from the flags Main parses.
func TestDocs(t *testing.T) {
	testkit.Golden(t, "../../../docs/qcryptd.md", Markdown())
	testkit.Golden(t, "../../../docs/man/qcryptd.8", ManPage())
}
