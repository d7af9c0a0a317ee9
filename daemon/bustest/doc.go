// Package bustest holds qcryptd's scenarios through its real binaries: qcryptd and
// qcryptctl built from cmd/, a private bus (dbus-daemon, or dbus-broker under
// QCRYPT_TEST_BUS=dbus-broker), and a simulated Qubes world (qubessim). The daemon
// package's own tests drive its event loop in-process with fakes; these drive the
// product as a user does, over the bus. make test-broker runs them all again under
// dbus-broker.
package bustest
