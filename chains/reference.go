package chains

import (
	"fmt"
	"strings"
)

// KeyDoc documents one key of a chain file.
type KeyDoc struct {
	Key, Value, Default, Meaning string
}

// Reference documents every key of a chain file, in the order docs show them. The
// loader's list of known keys comes from it (the numbered destination keys are matched
// by pattern).
var Reference = []KeyDoc{
	{keySourceVM, "QUBE", "(required)", "the qube that holds the container file"},
	{keySourceDevice, "/dev/PATH", "none", "a block device in the source qube to mount first (a USB disk); needs `source mount point`"},
	{keySourceMountPoint, "/PATH", "none", "where the source device is mounted in the source qube; `source file` is relative to it"},
	{keySourceFile, "PATH", "(required)", "the container file in the source qube, relative to `source mount point` (`/` without one)"},
	{keyKey, "KEY_ID", "(required)", "the key id: each destination reads `~/.qcrypt/keys/KEY_ID` and names its mapper KEY_ID"},
	{"destination vm N", "QUBE", "(N=1 required)", "the qube that decrypts layer N, numbered 1, 2, ... without gaps; the last one sees the plaintext"},
	{"destination inj N", "/PATH or keystore://", "none", "a dom0 key file injected into destination N when it has no key (keystore://[DIR]: from blib's key store, default /etc/blib/keys, as the original's QUBE_KEY.key; the check requires the store to exist and be root's; while it is locked the chain waits: qcryptctl keystore unlock)"},
	{"destination opt N", "OPTIONS", "none", "extra cryptsetup options for destination N (a safe subset: --type, --cipher, --key-size, --hash, --offset, ...)"},
	{"destination ciphers N", "CIPHER ...", "aes-xts-plain64 serpent-xts-plain64 twofish-xts-plain64 xchacha12,aes-adiantum-plain64 xchacha20,aes-adiantum-plain64",
		"the ciphers layer N may use, cryptsetup's spelling, space-separated: after the open the qube reports what the kernel runs (dmsetup table) and the layer is closed again unless every segment uses one of them with a key of at least 256 bits; the null cipher, ECB and a null IV are never allowed"},
	{keyMountPoint, "/PATH", "none", "where the last destination mounts the plaintext"},
	{keyMountOptions, "OPTION,...", DefaultMountOptions, "mount options for the plaintext (NAME or NAME=VALUE, comma-separated; replaces the default, as udisks' for removable media: no set-user-ID programs, no device nodes); read-only comes from `read-only`"},
	{keyAutostart, "BOOL", "false", "also start the source and the target to open the chain (intermediates are always started)"},
	{keyReadOnly, "BOOL", "true", "attach, decrypt and mount read-only everywhere"},
	{keyType, "luks, plain, loopaes or tcrypt", "luks", "the container type"},
	{keyInterval, "SECONDS", "300", "after a failed automatic open, wait this long before the next (0: at the next event)"},
	{keyPreOpen, "COMMAND", "none", "a dom0 command (sh, as root) run before an open; its failure vetoes the open"},
	{keyPostOpen, "COMMAND", "none", "a dom0 command run after an open"},
	{keyPreClose, "COMMAND", "none", "a dom0 command run before a close (its failure is logged, the close goes on)"},
	{keyPostClose, "COMMAND", "none", "a dom0 command run after a close"},
}

// plainKeys are the keys matched by name.
var plainKeys = func() []string {
	var out []string
	for _, k := range Reference {
		if !strings.HasSuffix(k.Key, " N") {
			out = append(out, k.Key)
		}
	}
	return out
}()

// ReferenceMarkdown is docs/qcrypt.ini.md: the chain file format.
func ReferenceMarkdown() string {
	var b strings.Builder
	b.WriteString("# qcrypt.ini\n\n<!-- Generated from chains/reference.go (`TESTS_UPDATE_GOLDEN=1 go test ./chains -run TestReferenceDoc`); do not edit. -->\n\n")
	b.WriteString("A chain file, `" + DefaultConfigRoot + "/TARGET/NAME.ini`, describes the chain NAME that qcryptd opens for the config target TARGET " +
		"(`qcryptd --target`, default `default`). Lines are `key=value`; `#` and `;` start comments; sections, duplicate and unknown keys are errors. " +
		"The keys are those of the original qcryptd. The file and its directories must be root's and not group or world writable: " +
		"a chain file chooses dom0 files to inject, and its commands run as root. `qcryptctl check` and `qcryptd check` report every error of every file at once.\n\n")
	b.WriteString("| key | value | default | meaning |\n|---|---|---|---|\n")
	for _, k := range Reference {
		fmt.Fprintf(&b, "| `%s` | %s | %s | %s |\n", k.Key, k.Value, k.Default, k.Meaning)
	}
	b.WriteString("\nBooleans are true/false, yes/no, 1/0 or on/off. Example:\n\n```ini\n" + exampleChain + "```\n")
	return b.String()
}

const exampleChain = `source vm=sys-usb
source device=/dev/disk/by-label/BACKUP
source mount point=/mnt/backup
source file=containers/work.luks
key=work-key
destination vm 1=mediator
destination vm 2=work
destination mount point=/mnt/secure
read-only=false
`
