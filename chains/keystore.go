package chains

import (
	"bytes"
	"context"
	"crypto/md5" // blib names the store's mapper by an md5 of its path; not for security
	"encoding/hex"
	"errors"
	"fmt"
	"path"
	"regexp"
	"slices"
	"sort"
	"strings"

	"github.com/qcrypt/qcrypt/qubes"
)

// The blib key store (3hhh/blib, lib/keys and lib/dmcrypt), which the original qcrypt
// uses for dom0 copies of its keys: a LUKS container DIR/keys.lks (20 MiB, ext4) opened
// with one master password; qcrypt's keys are the files qcrypt/QUBE_KEY.key inside.
// The layout, the container and the mapper name are blib's, so a store made by either
// tool works with the other. qcryptd mounts the store read-only under its runtime
// directory (private to its mount namespace under systemd) and writes only while adding
// keys.

const (
	// DefaultKeystoreDir is blib's default store (B_CONF_DIR/keys).
	DefaultKeystoreDir = "/etc/blib/keys"
	// DefaultKeystoreMounts is where qcryptd mounts the stores it unlocked.
	DefaultKeystoreMounts = "/run/qcryptd/keystore"
	keystoreScheme        = "keystore://"
	keystoreAppID         = "qcrypt" // blib's application id: the original's script name
	keystoreSize          = 20 << 20
	maxKeystoreKey        = 64 << 10
)

// Errors of the key store callers act on.
var (
	ErrKeystoreMissing  = errors.New("no key store there")
	ErrKeystoreLocked   = errors.New("the key store is locked")
	ErrWrongPassword    = errors.New("wrong password for the key store")
	ErrKeystoreHasKey   = errors.New("the key store already holds that key")
	ErrKeystoreNoKey    = errors.New("the key store holds no such key")
	ErrKeystoreExists   = errors.New("a key store exists there already")
	ErrKeystorePassword = errors.New("an empty password")
)

var keystoreDirRE = regexp.MustCompile(`^/[A-Za-z0-9_.+@/-]*$`)

// ParseKeystoreRef reads keystore://[DIR] (as in the original's --inj and its chain
// files): DIR is an absolute path, none means the default store. ok is false for a
// string that is not a key store reference at all.
func ParseKeystoreRef(s string) (dir string, ok bool, err error) {
	rest, ok := strings.CutPrefix(s, keystoreScheme)
	if !ok {
		return "", false, nil
	}
	if rest == "" || rest == "/" {
		return DefaultKeystoreDir, true, nil
	}
	dir, err = CleanKeystoreDir(rest)
	return dir, true, err
}

// CleanKeystoreDir checks a store directory given by a user: absolute, plain characters.
func CleanKeystoreDir(dir string) (string, error) {
	if !keystoreDirRE.MatchString(dir) || strings.Contains(dir, "/../") || strings.HasSuffix(dir, "/..") {
		return "", fmt.Errorf("key store directory %s: want an absolute path of letters, digits and _.+@/-", Quote(dir))
	}
	return path.Clean(dir), nil
}

// Keystore is one store, named by its directory.
type Keystore struct{ Dir string }

// Container is the LUKS file of the store.
func (k Keystore) Container() string { return path.Join(k.Dir, "keys.lks") }

// MapperName is blib's: "blib-dmcrypt-" and the md5 of the container's canonical path
// with the newline its shell here-string adds, so a store the original opened is seen
// open here and the other way round. The scripts derive it in dom0 from the path with
// symbolic links resolved, as blib does; this one names the mount point.
func (k Keystore) MapperName() string {
	sum := md5.Sum([]byte(path.Clean(k.Container()) + "\n"))
	return "blib-dmcrypt-" + hex.EncodeToString(sum[:])
}

// KeystoreDirs lists the stores the chain injects keys from, each once.
func (c *Chain) KeystoreDirs() []string {
	var out []string
	for _, h := range c.Hops {
		if dir, ok, err := ParseKeystoreRef(h.Inject); ok && err == nil && !slices.Contains(out, dir) {
			out = append(out, dir)
		}
	}
	return out
}

// KeyFile is a qube's key inside the store, relative to its root.
func KeyFile(vm, key string) string { return path.Join(keystoreAppID, vm+"_"+key+".key") }

func (e *Engine) keystoreMount(k Keystore) string {
	root := e.KeystoreMounts
	if root == "" {
		root = DefaultKeystoreMounts
	}
	return path.Join(root, k.MapperName())
}

// KeystoreState is what dom0 shows of a store.
type KeystoreState struct {
	Dir      string `json:"dir"`
	Exists   bool   `json:"exists"`   // the container is there
	Open     bool   `json:"open"`     // its mapper is active (by qcryptd or the original)
	Unlocked bool   `json:"unlocked"` // qcryptd has it mounted: keys can be read
}

// Exit statuses of the key store scripts.
const (
	ksMissing    = 10
	ksWrongPass  = 11
	ksOpenFailed = 12
	ksMount      = 13
	ksLocked     = 14
	ksNoKey      = 15
	ksHasKey     = 16
	ksExists     = 17
	ksWrite      = 18
	ksClose      = 19
)

func keystoreError(code int, stderr []byte) error {
	switch code {
	case ksMissing:
		return ErrKeystoreMissing
	case ksWrongPass:
		return ErrWrongPassword
	case ksLocked:
		return ErrKeystoreLocked
	case ksNoKey:
		return ErrKeystoreNoKey
	case ksHasKey:
		return ErrKeystoreHasKey
	case ksExists:
		return ErrKeystoreExists
	case ksOpenFailed:
		return fmt.Errorf("cryptsetup cannot open the key store: %s", qubes.Printable(string(stderr), 300))
	case ksMount:
		return fmt.Errorf("cannot mount the key store: %s", qubes.Printable(string(stderr), 300))
	case ksWrite:
		return fmt.Errorf("cannot write to the key store: %s", qubes.Printable(string(stderr), 300))
	case ksClose:
		return fmt.Errorf("cannot close the key store (mounted elsewhere?): %s", qubes.Printable(string(stderr), 300))
	}
	return fmt.Errorf("the key store script failed (exit %d): %s", code, qubes.Printable(string(stderr), 300))
}

// keystoreVars starts every store script: the paths, quoted.
func (e *Engine) keystoreVars(k Keystore) string {
	// Not every key store script uses the mapper's name.
	return fmt.Sprintf("c=%s\n# shellcheck disable=SC2034\nm=blib-dmcrypt-$(readlink -m \"$c\" | md5sum | cut -d' ' -f1)\nmp=%s\n",
		q(k.Container()), q(e.keystoreMount(k)))
}

func (e *Engine) runKeystore(ctx context.Context, k Keystore, script string, input []byte) (qubes.Result, error) {
	if e.Dom0 == nil {
		return qubes.Result{}, errors.New("cannot reach the key store: no dom0 runner")
	}
	var res qubes.Result
	var err error
	if input != nil {
		res, err = e.Dom0.Run(ctx, e.keystoreVars(k)+script, bytes.NewReader(input))
	} else {
		res, err = e.Dom0.Run(ctx, e.keystoreVars(k)+script, nil)
	}
	if err != nil {
		return res, fmt.Errorf("cannot reach the key store %s: %w", k.Dir, err)
	}
	if res.ExitCode != 0 {
		return res, fmt.Errorf("key store %s: %w", k.Dir, keystoreError(res.ExitCode, res.Stderr))
	}
	return res, nil
}

// KeystoreStatus says whether the store exists, is open and is unlocked for qcryptd.
func (e *Engine) KeystoreStatus(ctx context.Context, k Keystore) (KeystoreState, error) {
	st := KeystoreState{Dir: k.Dir}
	res, err := e.runKeystore(ctx, k, `[ -f "$c" ] || { echo 0 0 0; exit 0; }
o=0; cryptsetup status "$m" >/dev/null 2>&1 && o=1
u=0; mountpoint -q "$mp" 2>/dev/null && u=1
echo 1 $o $u`, nil)
	if err != nil {
		return st, err
	}
	var exists, open, unlocked int
	if _, err := fmt.Sscanf(string(res.Stdout), "%d %d %d", &exists, &open, &unlocked); err != nil {
		return st, fmt.Errorf("cannot read the state of key store %s: %q", k.Dir, qubes.Printable(string(res.Stdout), 40))
	}
	st.Exists, st.Open, st.Unlocked = exists == 1, open == 1, unlocked == 1
	return st, nil
}

// openAndMount opens the container with the password that follows on stdin (when
// closed: one the original left open needs none) and mounts it read-only. Read-only
// per mount, as blib's own read-only view: the file system may be mounted read-write
// by the original, and one file system cannot be both at once.
const openAndMount = `if ! cryptsetup status "$m" >/dev/null 2>&1; then
  [ "$plen" -gt 0 ] || exit 14
  cryptsetup open --type luks --key-file=- --keyfile-size="$plen" "$c" "$m"; r=$?
  [ $r = 2 ] && exit 11
  [ $r = 0 ] || exit 12
fi
mkdir -p -m 0700 "$mp" || exit 13
if ! mountpoint -q "$mp"; then
  mount -o nodev,nosuid,noexec "/dev/mapper/$m" "$mp" || exit 13
  mount -o remount,bind,` + roFlags + ` "$mp" || { umount "$mp"; exit 13; }
fi
`

// The per-mount flags of an unlocked store; a bind remount sets all of them at once.
const (
	roFlags = "ro,nodev,nosuid,noexec"
	rwFlags = "rw,nodev,nosuid,noexec"
)

// KeystoreUnlock opens and mounts the store with password. A wrong password changes
// nothing (ErrWrongPassword). A store open already (the original opened it) is only
// mounted and needs no password; without one, a closed store is ErrKeystoreLocked.
// The password is not kept.
func (e *Engine) KeystoreUnlock(ctx context.Context, k Keystore, password []byte) error {
	_, err := e.runKeystore(ctx, k, fmt.Sprintf("plen=%d\n[ -f \"$c\" ] || exit 10\n", len(password))+openAndMount, password)
	return err
}

// KeystoreLock unmounts the store and closes it.
func (e *Engine) KeystoreLock(ctx context.Context, k Keystore) error {
	_, err := e.runKeystore(ctx, k, `if mountpoint -q "$mp" 2>/dev/null; then umount "$mp" || exit 13; fi
rmdir "$mp" 2>/dev/null
if cryptsetup status "$m" >/dev/null 2>&1; then cryptsetup close "$m" || exit 19; fi
exit 0`, nil)
	return err
}

// KeystoreKey reads vm's key for key id key from an unlocked store. A store still open
// since an unlock this boot (qcryptd restarted since, and its mount went with its mount
// namespace; or the original opened it) is mounted again without a password: it is
// unlocked until someone locks it.
func (e *Engine) KeystoreKey(ctx context.Context, k Keystore, vm, key string) ([]byte, error) {
	if err := checkKeyName(vm, key); err != nil {
		return nil, err
	}
	res, err := e.runKeystore(ctx, k, "plen=0\n"+openAndMount+fmt.Sprintf(`f="$mp"/%s
[ -f "$f" ] || exit 15
[ "$(wc -c < "$f")" -le %d ] || exit 15
cat "$f"`, q(KeyFile(vm, key)), maxKeystoreKey), nil)
	if err != nil {
		return nil, err
	}
	if res.StdoutTruncated || len(res.Stdout) == 0 {
		return nil, fmt.Errorf("key store %s: %s: %w", k.Dir, KeyFile(vm, key), ErrKeystoreNoKey)
	}
	return res.Stdout, nil
}

// KeystoreAdd adds keys (qube -> key) for key id key to an unlocked store: it refuses
// when any of them is there already and then adds none. The store is writable only
// for this call.
func (e *Engine) KeystoreAdd(ctx context.Context, k Keystore, key string, keys map[string][]byte) error {
	vms := make([]string, 0, len(keys))
	for vm := range keys {
		if err := checkKeyName(vm, key); err != nil {
			return err
		}
		vms = append(vms, vm)
	}
	sort.Strings(vms)
	var b strings.Builder
	b.WriteString(`mountpoint -q "$mp" 2>/dev/null || exit 14
`)
	for _, vm := range vms {
		fmt.Fprintf(&b, "[ -e \"$mp\"/%s ] && exit 16\n", q(KeyFile(vm, key)))
	}
	// Each write is checked; a failure still puts the store back read-only.
	b.WriteString(`mount -o remount,bind,` + rwFlags + ` "$mp" || exit 13
add() {
  mkdir -p -m 0700 "$mp"/` + keystoreAppID + ` || return 1
`)
	var input []byte
	for _, vm := range vms {
		f := q(KeyFile(vm, key))
		fmt.Fprintf(&b, "  (umask 077; head -c %d > \"$mp\"/%s) || return 1\n  [ \"$(wc -c < \"$mp\"/%s)\" -eq %d ] || return 1\n",
			len(keys[vm]), f, f, len(keys[vm]))
		input = append(input, keys[vm]...)
	}
	b.WriteString(`  sync
}
add; r=$?
mount -o remount,bind,` + roFlags + ` "$mp" || exit 13
[ $r = 0 ] || exit 18
exit 0`)
	defer clear(input)
	_, err := e.runKeystore(ctx, k, b.String(), input)
	return err
}

// keystoreCanTake checks, before anything is made, that the store is unlocked and has
// no key of the chain's destinations.
func (e *Engine) keystoreCanTake(ctx context.Context, k Keystore, c *Chain) error {
	var b strings.Builder
	b.WriteString(`mountpoint -q "$mp" 2>/dev/null || exit 14
`)
	for _, h := range c.Hops {
		if err := checkKeyName(h.VM, c.Key); err != nil {
			return err
		}
		fmt.Fprintf(&b, "[ -e \"$mp\"/%s ] && exit 16\n", q(KeyFile(h.VM, c.Key)))
	}
	b.WriteString("exit 0")
	_, err := e.runKeystore(ctx, k, b.String(), nil)
	return err
}

// KeystoreInit creates a store as blib does (20 MiB of random bytes, LUKS with the
// password, ext4, qcrypt's directory) and leaves it unlocked. It refuses a directory
// that holds a store already.
func (e *Engine) KeystoreInit(ctx context.Context, k Keystore, password []byte) error {
	if len(password) == 0 {
		return ErrKeystorePassword
	}
	script := fmt.Sprintf(`plen=%d
[ -e "$c" ] && exit 17
mkdir -p -m 0700 "$(dirname "$c")" || exit 18
create() {
  head -c %d < /dev/urandom > "$c" || return 1
  cryptsetup -q luksFormat --key-file=- --keyfile-size="$plen" "$c" || return 1
  cryptsetup open --type luks --key-file=- --keyfile-size="$plen" "$c" "$m" || return 1
  mkfs.ext4 -q "/dev/mapper/$m" || return 1
  mkdir -p -m 0700 "$mp" || return 1
  mount -o nodev,nosuid,noexec "/dev/mapper/$m" "$mp" || return 1
  mkdir -m 0700 "$mp"/%s || return 1
  mount -o remount,bind,%s "$mp"
}
if ! create; then
  umount "$mp" 2>/dev/null; cryptsetup close "$m" 2>/dev/null; rm -f "$c"; exit 18
fi
exit 0`, len(password), keystoreSize, keystoreAppID, roFlags)
	// The password twice: luksFormat reads it, then the open.
	input := append(append([]byte{}, password...), password...)
	defer clear(input)
	_, err := e.runKeystore(ctx, k, script, input)
	return err
}

func checkKeyName(vm, key string) error {
	if err := qubes.ValidateVMName(vm); err != nil {
		return fmt.Errorf("key store: %w", err)
	}
	if !keyIDRE.MatchString(key) {
		return fmt.Errorf("key store: invalid key id %q", qubes.Printable(key, 40))
	}
	return nil
}
