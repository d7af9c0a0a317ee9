// Package chains is qcrypt's domain: what a chain is, how it is configured, and the exact
// steps that open, close, inspect and create one. It talks to Qubes only through the small
// interfaces in qubes.go and imports no D-Bus or systemd code.
package chains

import (
	"errors"
	"fmt"
	"path"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
)

// Chain is one configured (or ad-hoc) chain: a container file in a source qube,
// decrypted layer by layer by the destination qubes in order; the last one is the
// target that may mount the plaintext.
type Chain struct {
	Name string // file name without .ini; for ad-hoc chains derived from the key
	File string // config file, empty for ad-hoc chains

	SourceVM         string
	SourceDevice     string // optional block device holding the file system with the container
	SourceMountPoint string // where SourceDevice is mounted in SourceVM
	SourceFile       string // path of the container, relative to SourceMountPoint
	Key              string // key id = file name under ~/.qcrypt/keys = mapper name
	Hops             []Hop
	MountPoint       string // in the target; empty: not mounted
	// MountOptions are mount's -o for the plaintext; "": DefaultMountOptions.
	MountOptions string
	// MountAnywhere (status of an ad-hoc spec only): the plaintext counts as there when
	// it is mounted, wherever; the original's status --mp "".
	MountAnywhere bool
	Type          string // cryptsetup --type for every layer: luks (default), plain, loopaes, tcrypt

	Autostart       bool
	ReadOnly        bool
	StartupInterval time.Duration

	PreOpen, PostOpen, PreClose, PostClose string // dom0 commands run as root

	keyLine int // line of "key" in File, for error messages
}

// Hop is one destination qube.
type Hop struct {
	VM      string
	Inject  string   // dom0 key file to inject if the qube has none, or keystore://[dir]
	Options []string // extra cryptsetup options, allow-listed
	Ciphers []string // the ciphers its layer may use; nil: DefaultCiphers
}

// Target is the last destination qube, the one that sees the plaintext.
func (c *Chain) Target() string { return c.Hops[len(c.Hops)-1].VM }

// Container is the absolute path of the container file inside the source qube.
func (c *Chain) Container() string {
	return path.Join("/", c.SourceMountPoint, c.SourceFile)
}

// VMs lists the source and the destinations in chain order.
func (c *Chain) VMs() []string {
	out := []string{c.SourceVM}
	for _, h := range c.Hops {
		out = append(out, h.VM)
	}
	return out
}

// Involves reports whether vm is part of the chain.
func (c *Chain) Involves(vm string) bool {
	for _, v := range c.VMs() {
		if v == vm {
			return true
		}
	}
	return false
}

// Hooks are the commands a chain runs in dom0 as root.
func (c *Chain) Hooks() []string {
	var out []string
	for _, h := range []string{c.PreOpen, c.PostOpen, c.PreClose, c.PostClose} {
		if h != "" {
			out = append(out, h)
		}
	}
	return out
}

// Equal reports whether two chains are configured identically.
func (c *Chain) Equal(o *Chain) bool {
	a, b := *c, *o
	a.keyLine, b.keyLine = 0, 0
	return fmt.Sprintf("%#v", a) == fmt.Sprintf("%#v", b)
}

var keyIDRE = regexp.MustCompile(`^[0-9a-zA-Z_+.-]+$`)

// ValidateKeyID accepts the key ids of the original tool (they are also mapper names).
func ValidateKeyID(k string) error {
	if !keyIDRE.MatchString(k) || k == "." || k == ".." || len(k) > 127 {
		return fmt.Errorf("key id %q must match ^[0-9a-zA-Z_+.-]+$", qubes.Printable(k, 40))
	}
	return nil
}

// DefaultMountOptions are the plaintext's mount options unless a chain says otherwise:
// as udisks mounts removable media, no set-user-ID programs and no device nodes from a
// file system that came from untrusted storage.
const DefaultMountOptions = "nosuid,nodev"

// mountOptionsRE is a safe mount option list: words and word=value, comma-separated.
var mountOptionsRE = regexp.MustCompile(`^[a-z0-9_]+(=[A-Za-z0-9_.:/+-]+)?(,[a-z0-9_]+(=[A-Za-z0-9_.:/+-]+)?)*$`)

// mountOptions is -o for the plaintext.
func (c *Chain) mountOptions() string {
	if c.MountOptions != "" {
		return c.MountOptions
	}
	return DefaultMountOptions
}

// MaxLayers is the most layers a chain may have. The original has no limit; no real
// chain comes near it, and it bounds what one request makes qcryptd hold.
const MaxLayers = 32

// maxPath is the longest path accepted (Linux' PATH_MAX less its NUL).
const maxPath = 4095

// Quote quotes a value a caller or a file gave for an error message: at most 200 bytes
// of it, so an error never echoes a huge argument back.
func Quote(s string) string {
	const limit = 200
	if len(s) > limit {
		return strconv.Quote(s[:limit]) + fmt.Sprintf("... (%d bytes)", len(s))
	}
	return strconv.Quote(s)
}

// validatePath accepts a path for a shell script: no control bytes, no "..", not
// longer than PATH_MAX, and absolute when required.
func validatePath(p string, absolute bool) error {
	if p == "" {
		return fmt.Errorf("empty path")
	}
	if len(p) > maxPath {
		return fmt.Errorf("path %s is longer than %d bytes", Quote(p), maxPath)
	}
	for i := 0; i < len(p); i++ {
		if p[i] < 0x20 || p[i] == 0x7f {
			return fmt.Errorf("path contains a control character")
		}
	}
	if absolute && !strings.HasPrefix(p, "/") {
		return fmt.Errorf("path %s must be absolute", Quote(p))
	}
	for _, part := range strings.Split(p, "/") {
		if part == ".." {
			return fmt.Errorf("path %s must not contain a .. component", Quote(p))
		}
	}
	return nil
}

// cryptsetup options a user may give per qube: option -> value pattern ("" = flag).
var cryptOptions = map[string]*regexp.Regexp{
	"--type": regexp.MustCompile(`^(luks|luks1|luks2|plain|loopaes|tcrypt|bitlk)$`), "-M": nil,
	"--cipher": valueRE, "-c": nil, "--key-size": numRE, "-s": nil, "--hash": valueRE, "-h": nil,
	"--offset": numRE, "-o": nil, "--skip": numRE, "-p": nil, "--size": numRE, "-b": nil,
	"--sector-size": numRE, "--keyfile-offset": numRE, "--keyfile-size": numRE, "-l": nil,
	"--allow-discards": nil, "--iv-large-sectors": nil, "--perf-same_cpu_crypt": nil,
	"--perf-submit_from_crypt_cpus": nil, "--perf-no_read_workqueue": nil, "--perf-no_write_workqueue": nil,
	"--disable-keyring": nil, "--tcrypt-hidden": nil, "--tcrypt-system": nil, "--veracrypt": nil,
	// luksFormat tuning (cryptsetup refuses most of it with open: see actionOnly)
	"--pbkdf": regexp.MustCompile(`^(argon2i|argon2id|pbkdf2)$`), "--pbkdf-memory": numRE,
	"--pbkdf-force-iterations": numRE, "--pbkdf-parallel": numRE, "--iter-time": numRE, "-i": nil,
	"--use-urandom": nil, "--use-random": nil,
}

var (
	valueRE = regexp.MustCompile(`^[A-Za-z0-9:_.,+-]{1,64}$`)
	numRE   = regexp.MustCompile(`^[0-9]{1,12}$`)
	shortOf = map[string]string{"-M": "--type", "-c": "--cipher", "-s": "--key-size", "-h": "--hash", "-o": "--offset", "-p": "--skip", "-b": "--size", "-l": "--keyfile-size", "-i": "--iter-time"}
)

// actionOnly lists the options cryptsetup 2.6 refuses with the other action ("Option
// --pbkdf is not allowed with open action"): a hop's options are given to each action
// without the other's.
var actionOnly = map[string]map[string]bool{
	"luksFormat": {"--pbkdf": true, "--pbkdf-force-iterations": true, "--iter-time": true, "--use-urandom": true, "--use-random": true},
	"open":       {"--skip": true, "--size": true, "--allow-discards": true, "--iv-large-sectors": true, "--tcrypt-hidden": true, "--tcrypt-system": true},
}

// CryptArgs are the cryptsetup options of hop i for action "open" or "luksFormat": the
// chain's type (unless the hop names one) and the hop's options that action accepts.
func (c *Chain) CryptArgs(i int, action string) []string {
	opts := c.Hops[i].Options
	var out []string
	if c.Type != "" && c.Type != "luks" && !hasOption(opts, "--type") {
		out = append(out, "--type", c.Type)
	}
	other := actionOnly["open"]
	if action == "open" {
		other = actionOnly["luksFormat"]
	}
	for j := 0; j < len(opts); j++ {
		takesValue := cryptOptions[opts[j]] != nil
		if !other[opts[j]] {
			out = append(out, opts[j])
			if takesValue && j+1 < len(opts) {
				out = append(out, opts[j+1])
			}
		}
		if takesValue {
			j++
		}
	}
	return out
}

// ParseCryptOptions splits and checks "destination opt N" / --cy options against the
// allow-list; values must be plain tokens, so the options can be quoted safely.
func ParseCryptOptions(s string) ([]string, error) {
	if strings.ContainsAny(s, "'\"\\`$;&|<>(){}\n") {
		return nil, fmt.Errorf("cryptsetup options %q contain shell syntax", qubes.Printable(s, 60))
	}
	fields := strings.Fields(s)
	var out []string
	for i := 0; i < len(fields); i++ {
		name, val, hasVal := strings.Cut(fields[i], "=")
		if long, ok := shortOf[name]; ok {
			name = long
		}
		re, ok := cryptOptions[name]
		if !ok {
			return nil, fmt.Errorf("cryptsetup option %s is not allowed", Quote(fields[i]))
		}
		if re == nil {
			if hasVal {
				return nil, fmt.Errorf("cryptsetup option %s takes no value", name)
			}
			out = append(out, name)
			continue
		}
		if !hasVal {
			if i+1 >= len(fields) {
				return nil, fmt.Errorf("cryptsetup option %s needs a value", name)
			}
			i++
			val = fields[i]
		}
		if !re.MatchString(val) {
			return nil, fmt.Errorf("cryptsetup option %s: bad value %s", name, Quote(val))
		}
		out = append(out, name, val)
	}
	return out, nil
}

// problem is a rule a chain breaks, under the config key it concerns.
type problem struct{ key, msg string }

// problems checks a chain against the rules every chain obeys, whether it came from a
// config file (LoadFile, which also checks the file's syntax) or from a caller (an
// ad-hoc chain, a luks-init spec): the one validator of both.
func (c *Chain) problems() []problem {
	var out []problem
	add := func(key, format string, a ...any) { out = append(out, problem{key, fmt.Sprintf(format, a...)}) }
	if err := qubes.ValidateMemberName(c.SourceVM); err != nil {
		add(keySourceVM, "%v", err)
	}
	if c.SourceDevice != "" {
		if err := validatePath(c.SourceDevice, true); err != nil {
			add(keySourceDevice, "%v", err)
		} else if !strings.HasPrefix(c.SourceDevice, "/dev/") {
			add(keySourceDevice, "must be a device path under /dev/")
		} else if c.SourceMountPoint == "" {
			add(keySourceDevice, "needs a %q", keySourceMountPoint)
		}
	}
	if c.SourceMountPoint != "" {
		if err := validatePath(c.SourceMountPoint, true); err != nil {
			add(keySourceMountPoint, "%v", err)
		}
	}
	// Relative to the source mount point (the original's rule, "/" without one).
	if err := validatePath(c.SourceFile, false); err != nil {
		add(keySourceFile, "%v", err)
	} else if c.Container() == "/" {
		add(keySourceFile, "does not name a file")
	}
	if err := ValidateKeyID(c.Key); err != nil {
		add(keyKey, "%v", err)
	}
	if c.MountPoint != "" {
		if err := validatePath(c.MountPoint, true); err != nil {
			add(keyMountPoint, "%v", err)
		} else if c.MountPoint == "/" {
			add(keyMountPoint, "must not be /")
		}
	}
	if c.MountOptions != "" {
		switch {
		case !mountOptionsRE.MatchString(c.MountOptions) || len(c.MountOptions) > 256:
			add(keyMountOptions, "%s is not a list of mount options (NAME or NAME=VALUE, comma-separated)", Quote(c.MountOptions))
		case c.MountPoint == "":
			add(keyMountOptions, "needs a %q", keyMountPoint)
		}
	}
	if len(c.Hops) == 0 {
		add("destination vm 1", "missing (at least one destination is required)")
	}
	if len(c.Hops) > MaxLayers {
		add(fmt.Sprintf("destination vm %d", MaxLayers+1), "a chain has at most %d layers, this one has %d", MaxLayers, len(c.Hops))
		return out
	}
	seen := map[string]bool{}
	for i, h := range c.Hops {
		vmKey := fmt.Sprintf("destination vm %d", i+1)
		switch err := qubes.ValidateMemberName(h.VM); {
		case err != nil:
			add(vmKey, "%v", err)
		case seen[h.VM]:
			add(vmKey, "qube %s decrypts more than one layer (the key id is its mapper name)", h.VM)
		case h.VM == c.SourceVM:
			add(vmKey, "the source qube must not decrypt")
		}
		seen[h.VM] = true
		if h.Inject != "" {
			if _, isStore, err := ParseKeystoreRef(h.Inject); isStore && err != nil {
				add(fmt.Sprintf("destination inj %d", i+1), "%v", err)
			} else if !isStore {
				if err := validatePath(h.Inject, true); err != nil {
					add(fmt.Sprintf("destination inj %d", i+1), "%v", err)
				}
			}
		}
	}
	return out
}

// Validate checks a chain that did not come from a config file (an ad-hoc chain or a
// luks-init spec) with the rules every chain obeys. Its file is given on a command
// line, as the original's: a full path, not one relative to a source mount point.
func (c *Chain) Validate() error {
	var errs []error
	if c.SourceFile != "" && !strings.HasPrefix(c.SourceFile, "/") {
		errs = append(errs, fmt.Errorf("%s: path %s must be absolute", keySourceFile, Quote(c.SourceFile)))
	}
	for _, p := range c.problems() {
		errs = append(errs, fmt.Errorf("%s: %s", p.key, p.msg))
	}
	return errors.Join(errs...)
}

// AdhocName names a chain that has no config file: key id and target, which together
// are unique (the key id is the target's mapper name).
func AdhocName(c *Chain) string { return c.Key + "@" + c.Target() }
