package systemd

import _ "embed"

// The files `make install` installs, embedded for the tests that check them.
var (
	//go:embed qcryptd.service
	Unit string
	//go:embed org.qcrypt.Qcryptd1.conf
	Policy string
	//go:embed org.qcrypt.Qcryptd1.service
	Activation string
)
