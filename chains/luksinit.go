package chains

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"

	"github.com/qcrypt/qcrypt/qubes"
)

// InitSpec describes a new container: the original's luksInit. The dom0 files are ones
// the caller opened with its own rights; the engine never opens a path a caller named.
type InitSpec struct {
	Chain     *Chain // source qube, container path (SourceFile), key id, destinations and their options
	Size      int64  // container bytes (default 1 GiB)
	KeySize   int    // key bytes (default 100)
	FS        string // btrfs (default, zstd compression) or ext4
	Autostart bool   // start halted qubes instead of refusing

	KeyEntropy       io.Reader            // nil: /dev/random
	ContainerEntropy io.Reader            // nil: /dev/urandom
	Container        *os.File             // an empty file to build in (needs Size free); nil: a file in the engine's private directory
	Backups          map[string]io.Writer // qube -> where a backup of its key goes
	// Keystore, when set, gets a copy of every key (QUBE_KEY.key), as the original's
	// luks-init --keystore; it must be unlocked and hold none of them.
	Keystore *Keystore
}

// DefaultPrivateDir is where luks-init keeps its keys and, unless the caller gives a
// work file, the container: root's alone, on a tmpfs, emptied at start-up.
const DefaultPrivateDir = "/run/qcryptd/luks-init"

var sizeRE = regexp.MustCompile(`^([0-9]+)([KMGT]?)$`)

// ParseSize reads sizes like 1G, 512M, 4096.
func ParseSize(s string) (int64, error) {
	m := sizeRE.FindStringSubmatch(strings.ToUpper(s))
	if m == nil {
		return 0, fmt.Errorf("size %s is not a number with an optional K, M, G or T", Quote(s))
	}
	n, err := strconv.ParseInt(m[1], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %s: %w", Quote(s), err)
	}
	shift := map[string]uint{"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m[2]]
	if n <= 0 || n > 1<<62>>shift {
		return 0, fmt.Errorf("size %s is out of range", Quote(s))
	}
	return n << shift, nil
}

// Validate fills in the defaults of a spec and checks it, before anything is made.
func (s *InitSpec) Validate() error {
	if s.Size == 0 {
		s.Size = 1 << 30
	}
	if s.KeySize == 0 {
		s.KeySize = 100
	}
	if s.FS == "" {
		s.FS = "btrfs"
	}
	c := s.Chain
	switch {
	case c == nil || len(c.Hops) == 0:
		return errors.New("luks-init needs a source qube, a file, a key id and at least one destination")
	case s.Size < 2<<20:
		return errors.New("the container must be at least 2 MiB")
	case s.KeySize < 16 || s.KeySize > 8192:
		return errors.New("the key size must be 16 to 8192 bytes")
	case s.FS != "btrfs" && s.FS != "ext4":
		return fmt.Errorf("file system %s is not btrfs or ext4", Quote(s.FS))
	}
	if need := minContainerSize(c); s.Size < need {
		// Otherwise cryptsetup fails deep inside: "Requested offset is beyond real size".
		return fmt.Errorf("the container must be at least %d MiB for %d layers: a LUKS2 header takes 16 MiB", need>>20, len(c.Hops))
	}
	for vm := range s.Backups {
		if !c.Involves(vm) || vm == c.SourceVM {
			return fmt.Errorf("a key backup for %s, which is not a destination", qubes.Printable(vm, 40))
		}
	}
	if err := validatePath(c.Container(), true); err != nil {
		return err
	}
	if err := ValidateKeyID(c.Key); err != nil {
		return err
	}
	for _, vm := range c.VMs() {
		if err := qubes.ValidateMemberName(vm); err != nil {
			return err
		}
	}
	return nil
}

// minContainerSize is what the layers' headers take plus 2 MiB for the file system:
// 16 MiB per LUKS2 layer (cryptsetup 2's default metadata and key slot area, found with
// the real tools), 2 MiB for LUKS1.
func minContainerSize(c *Chain) int64 {
	size := int64(2 << 20)
	for i := range c.Hops {
		args := c.CryptArgs(i, "luksFormat")
		typ := ""
		for j := 0; j+1 < len(args); j++ {
			if args[j] == "--type" {
				typ = args[j+1]
			}
		}
		if typ == "" || typ == "luks" || typ == "luks2" {
			size += 16 << 20
		} else {
			size += 2 << 20
		}
	}
	return size
}

// Exit codes of the luks-init scripts.
const (
	exitNoSpace     = 51
	exitBuildFailed = 52
)

// LuksInit creates a container with one LUKS layer per destination (the outermost for
// destination 1) and a file system inside, in dom0; copies the keys into the
// destinations and the container into the source, with byte progress; optionally keeps
// key backups in dom0. It refuses to overwrite any file or key, and removes its dom0
// files in every case, and what it copied into qubes when it fails. Its steps run
// through execute, as an open's do.
func (e *Engine) LuksInit(ctx context.Context, s InitSpec, progress ProgressFunc) error {
	if err := s.Validate(); err != nil {
		return fmt.Errorf("cannot create the container: %w", err)
	}
	if e.Dom0 == nil {
		return errors.New("cannot create the container: no dom0 runner")
	}
	li := &luksInit{e: e, s: s, log: e.log().WithFields(logrus.Fields{"chain": s.Chain.Name, "op": "luks-init"})}
	defer li.cleanup(ctx)
	return e.execute(ctx, s.Chain, "luks-init", li.actions(progress), progress)
}

// luksInit is one luks-init: what its steps learn and make on the way.
type luksInit struct {
	e        *Engine
	s        InitSpec
	log      *logrus.Entry
	keyPaths []string // each destination's key file
	keys     [][]byte
	dir      string // the dom0 working directory, once the build made it
}

// actions are luks-init's steps: the copies into qubes are undone when a later step
// fails.
func (li *luksInit) actions(progress ProgressFunc) []action {
	c, s := li.s.Chain, li.s
	acts := []action{
		{step: Step{Kind: "check", VM: "dom0", Desc: "check the qubes"}, do: li.check},
		{step: Step{Kind: "build", VM: "dom0", Desc: "build the container in dom0"}, do: li.build},
	}
	for i, h := range c.Hops {
		acts = append(acts, action{
			step:  Step{Kind: "key", VM: h.VM, Desc: "copy the key of layer " + fmt.Sprint(i+1) + " into " + h.VM},
			layer: i + 1,
			do: func(ctx context.Context) error {
				return li.e.copyIn(ctx, h.VM, bytes.NewReader(li.keys[i]), li.keyPaths[i], int64(s.KeySize), nil)
			},
			undo: func(ctx context.Context) error { return li.remove(ctx, h.VM, li.keyPaths[i]) },
		})
	}
	copyStep := len(acts) + 1
	steps := 0 // known once every action is listed
	copyDesc := "copy the container into " + c.SourceVM
	acts = append(acts, action{
		step: Step{Kind: "copy", VM: c.SourceVM, Desc: copyDesc},
		do: func(ctx context.Context) error {
			return li.copyContainer(ctx, func(n int64) {
				if progress != nil {
					progress(Progress{Step: copyStep, Steps: steps, Desc: copyDesc, Bytes: n, Total: s.Size})
				}
			})
		},
		undo: func(ctx context.Context) error { return li.remove(ctx, c.SourceVM, c.Container()) },
	})
	if s.Keystore != nil {
		acts = append(acts, action{
			step: Step{Kind: "keystore", VM: "dom0", Desc: "add the keys to the key store " + s.Keystore.Dir},
			do: func(ctx context.Context) error {
				add := map[string][]byte{}
				for i, h := range c.Hops {
					add[h.VM] = li.keys[i]
				}
				return li.e.KeystoreAdd(ctx, *s.Keystore, c.Key, add)
			},
		})
	}
	acts = append(acts, action{step: Step{Kind: "done", VM: "dom0", Desc: "done"}, do: func(context.Context) error {
		li.log.Info("container created")
		return nil
	}})
	steps = len(acts)
	return acts
}

// check: every qube exists and runs (started with autostart), no key and no container
// is there yet, and the key store can take the keys.
func (li *luksInit) check(ctx context.Context) error {
	e, c := li.e, li.s.Chain
	states, err := e.memberStates(ctx, c)
	if err != nil {
		return err
	}
	for _, vm := range c.VMs() {
		st, ok := states[vm]
		if !ok {
			return fmt.Errorf("cannot create the container: qube %s does not exist", vm)
		}
		if !qubes.IsRunning(st) || st == qubes.StatePaused {
			if !li.s.Autostart || st == qubes.StatePaused {
				return fmt.Errorf("cannot create the container: %w: %s (use autostart)", ErrAutostartOff, vm)
			}
			if err := e.Qubes.Start(ctx, vm); err != nil {
				return fmt.Errorf("cannot start %s: %w", vm, err)
			}
		}
	}
	li.keyPaths = make([]string, len(c.Hops))
	for i, h := range c.Hops {
		user, err := e.user(ctx, h.VM)
		if err != nil {
			return err
		}
		li.keyPaths[i] = keyPath(user, c.Key)
		if err := e.expectAbsent(ctx, h.VM, li.keyPaths[i], exitKeyExists); err != nil {
			return err
		}
	}
	if err := e.expectAbsent(ctx, c.SourceVM, c.Container(), exitFileExists); err != nil {
		return err
	}
	if li.s.Keystore != nil {
		if err := e.keystoreCanTake(ctx, *li.s.Keystore, c); err != nil {
			return fmt.Errorf("cannot create the container: %w", err)
		}
	}
	return nil
}

// build makes the keys and the container in dom0 and writes the key backups.
func (li *luksInit) build(ctx context.Context) error {
	e, s := li.e, li.s
	// A caller's entropy source may block for good (a terminal): a cancel ends its reads.
	for _, r := range []io.Reader{s.KeyEntropy, s.ContainerEntropy} {
		if d, ok := r.(interface{ SetReadDeadline(time.Time) error }); ok {
			stop := context.AfterFunc(ctx, func() { _ = d.SetReadDeadline(time.Now()) })
			defer stop()
		}
	}
	var err error
	if li.keys, err = makeKeys(s); err != nil {
		return err
	}
	var files []*os.File
	if s.Container != nil {
		if err := checkSpace(s.Container, s.Size); err != nil {
			return fmt.Errorf("cannot build the container: %w", err)
		}
		files = append(files, s.Container)
	}
	var input []io.Reader
	for _, k := range li.keys {
		input = append(input, bytes.NewReader(k))
	}
	if s.ContainerEntropy != nil {
		input = append(input, io.LimitReader(s.ContainerEntropy, s.Size))
	}
	res, err := e.Dom0.Run(ctx, buildScript(s, e.privateDir()), io.MultiReader(input...), files...)
	// The directory is wiped whatever happened, a canceled build included (it printed
	// the directory first).
	dir := strings.TrimSpace(strings.SplitN(string(res.Stdout), "\n", 2)[0])
	if strings.HasPrefix(dir, e.privateDir()+"/luks-init.") && validatePath(dir, true) == nil {
		li.dir = dir
	}
	if err != nil {
		return fmt.Errorf("cannot build the container: %w", err)
	}
	if res.ExitCode != 0 {
		msg := scriptError(res.ExitCode)
		switch res.ExitCode {
		case exitNoSpace:
			msg = fmt.Sprintf("not enough free space in %s for %d bytes (give a work directory on a disk: qcryptctl luks-init --wd DIR)", e.privateDir(), s.Size)
		case exitBuildFailed:
			msg = "cryptsetup, losetup or mkfs failed in dom0: " + qubes.Printable(string(res.Stderr), 300)
		}
		return fmt.Errorf("cannot build the container: %s", msg)
	}
	for i, h := range s.Chain.Hops {
		if w := s.Backups[h.VM]; w != nil {
			if _, err := w.Write(li.keys[i]); err != nil {
				return fmt.Errorf("cannot write the key backup for %s: %w", h.VM, err)
			}
		}
	}
	return nil
}

// copyContainer copies the container into the source qube, reporting bytes.
func (li *luksInit) copyContainer(ctx context.Context, report func(int64)) error {
	s, c := li.s, li.s.Chain
	var container io.Reader
	if s.Container != nil {
		container = io.NewSectionReader(s.Container, 0, s.Size)
	} else {
		f, err := li.e.Dom0.Open(path.Join(li.dir, "container"))
		if err != nil {
			return fmt.Errorf("cannot read the container in dom0: %w", err)
		}
		defer f.Close()
		container = f
	}
	return li.e.copyIn(ctx, c.SourceVM, container, c.Container(), s.Size, report)
}

// remove takes a copied file out of a qube again, and what a copy cut short left of
// it (copyIn writes p.part first).
func (li *luksInit) remove(ctx context.Context, vm, p string) error {
	_, err := li.e.Runner.Run(ctx, vm, "rm -f "+q(p)+" "+q(p+".part"), nil)
	return err
}

// cleanup runs in every case: the keys are cleared and the dom0 working directory is
// wiped.
func (li *luksInit) cleanup(ctx context.Context) {
	for _, k := range li.keys {
		clear(k)
	}
	if li.dir == "" {
		return
	}
	if _, err := li.e.Dom0.Run(context.WithoutCancel(ctx), wipeScript(li.dir), nil); err != nil {
		li.log.WithError(err).Error("cannot remove the dom0 working directory")
	}
}

// expectAbsent fails if path exists in vm.
func (e *Engine) expectAbsent(ctx context.Context, vm, p string, code int) error {
	res, err := e.run(ctx, vm, fmt.Sprintf("[ -e %s ] && exit %d; exit 0", q(p), code), nil)
	if err != nil {
		return err
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("cannot create the container: %s: %s in %s", scriptError(res.ExitCode), p, vm)
	}
	return nil
}

// copyIn streams exactly size bytes of src to dst in vm (mode 0600, refusing to
// overwrite), reporting bytes as they go.
func (e *Engine) copyIn(ctx context.Context, vm string, src io.Reader, dst string, size int64, bytes func(int64)) error {
	in := io.LimitReader(src, size)
	if bytes != nil {
		in = &countingReader{r: in, report: bytes}
	}
	script := fmt.Sprintf("d=%s\n[ -e \"$d\" ] && exit %d\numask 077\nmkdir -p %s || exit %d\n"+
		"head -c %d > \"$d.part\" && [ \"$(wc -c < \"$d.part\")\" -eq %d ] && mv \"$d.part\" \"$d\" && sync || { rm -f \"$d.part\"; exit %d; }",
		q(dst), exitFileExists, q(path.Dir(dst)), exitWriteFailed, size, size, exitWriteFailed)
	res, err := e.run(ctx, vm, script, in)
	if err != nil {
		return fmt.Errorf("cannot copy into %s: %w", vm, err)
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("cannot copy into %s: %s: %s", vm, scriptError(res.ExitCode), dst)
	}
	return nil
}

type countingReader struct {
	r      io.Reader
	n      int64
	report func(int64)
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	c.report(c.n)
	return n, err
}

// makeKeys reads one key per destination from the caller's entropy or /dev/random.
func makeKeys(s InitSpec) ([][]byte, error) {
	src := s.KeyEntropy
	if src == nil {
		f, err := os.Open("/dev/random")
		if err != nil {
			return nil, fmt.Errorf("cannot make keys: %w", err)
		}
		defer f.Close()
		src = f
	}
	keys := make([][]byte, len(s.Chain.Hops))
	for i := range keys {
		keys[i] = make([]byte, s.KeySize)
		if _, err := io.ReadFull(src, keys[i]); err != nil {
			return nil, fmt.Errorf("cannot make keys: the entropy source gave less than %d bytes: %w", s.KeySize, err)
		}
	}
	return keys, nil
}

// checkSpace fails unless the file system of f has size bytes free.
func checkSpace(f *os.File, size int64) error {
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		return fmt.Errorf("cannot check the free space of the work file: %w", err)
	}
	if free := int64(st.Bavail) * st.Bsize; free < size {
		return fmt.Errorf("not enough free space in the work directory for %d bytes (%d free)", size, free)
	}
	return nil
}

func (e *Engine) privateDir() string {
	if e.PrivateDir != "" {
		return e.PrivateDir
	}
	return DefaultPrivateDir
}

// buildScript makes the container in a fresh directory under the private directory
// (printed first): the keys come first on stdin, then, if the caller gave entropy, the
// container's bytes. The container is the caller's work file (descriptor 3) or a file
// there. One LUKS layer per destination, then the file system; mappers and the loop
// device are always torn down; the files stay for copying.
func buildScript(s InitSpec, private string) string {
	c := s.Chain
	var b strings.Builder
	fmt.Fprintf(&b, "umask 077\nmkdir -p %s && chmod 0700 %s || exit %d\n", q(private), q(private), exitBuildFailed)
	fmt.Fprintf(&b, "d=$(mktemp -d %s) || exit %d\necho \"$d\"\n", q(private+"/luks-init.XXXXXXXX"), exitBuildFailed)
	fmt.Fprintf(&b, "maps=''\nloop=''\ncleanup() { for m in $maps; do cryptsetup close \"$m\"; done; [ -n \"$loop\" ] && losetup -d \"$loop\"; }\ntrap cleanup EXIT\n")
	fmt.Fprintf(&b, "fail() { exit %d; }\n", exitBuildFailed)
	for i := range c.Hops {
		fmt.Fprintf(&b, "head -c %d > \"$d/key%d\" && [ \"$(wc -c < \"$d/key%d\")\" -eq %d ] || fail\n", s.KeySize, i, i, s.KeySize)
	}
	if s.Container != nil {
		b.WriteString("c=/dev/fd/3\n")
	} else {
		b.WriteString("c=\"$d/container\"\n")
		fmt.Fprintf(&b, "avail=$(df --output=avail -B1 \"$d\" | tail -n 1)\n[ \"$avail\" -gt %d ] 2>/dev/null || exit %d\n", s.Size, exitNoSpace)
	}
	if s.ContainerEntropy != nil {
		fmt.Fprintf(&b, "head -c %d > \"$c\" && [ \"$(wc -c < \"$c\")\" -eq %d ] || fail\n", s.Size, s.Size)
	} else {
		fmt.Fprintf(&b, "head -c %d < /dev/urandom > \"$c\" || fail\n", s.Size)
	}
	fmt.Fprintf(&b, "loop=$(losetup -f --show \"$c\") || fail\ndev=$loop\n")
	for i := range c.Hops {
		fmtOpts := c.CryptArgs(i, "luksFormat")
		if !hasOption(fmtOpts, "--type") && !hasOption(fmtOpts, "--pbkdf-memory") && !hasOption(fmtOpts, "--pbkdf") {
			// LUKS2's default argon2 memory kills small qubes (cryptsetup issue 372).
			fmtOpts = append(fmtOpts, "--pbkdf-memory", "10240")
		}
		name := fmt.Sprintf("qcrypt-init-$$-%d", i)
		fmt.Fprintf(&b, "cryptsetup -q --key-file \"$d/key%d\" %s luksFormat \"$dev\" || fail\n", i, qargs(fmtOpts))
		fmt.Fprintf(&b, "cryptsetup open --key-file \"$d/key%d\" %s \"$dev\" \"%s\" || fail\nmaps=\"%s $maps\"\ndev=\"/dev/mapper/%s\"\n", i, qargs(c.CryptArgs(i, "open")), name, name, name)
	}
	if s.FS == "btrfs" {
		fmt.Fprintf(&b, "mkfs.btrfs -q -f \"$dev\" || fail\nmkdir \"$d/mnt\" && mount \"$dev\" \"$d/mnt\" || fail\n")
		fmt.Fprintf(&b, "btrfs property set \"$d/mnt\" compression zstd; r=$?\numount \"$d/mnt\" || fail\n[ $r = 0 ] || fail\n")
	} else {
		fmt.Fprintf(&b, "mkfs.ext4 -q -F \"$dev\" || fail\n")
	}
	b.WriteString("exit 0")
	return b.String()
}

// wipeFunc overwrites the keys of a luks-init directory in place (truncating would
// hand their pages back unwritten) and removes it. The container holds ciphertext only:
// it is what the source qube now stores.
const wipeFunc = `wipe() { for k in "$1"/key*; do [ -f "$k" ] && dd if=/dev/zero of="$k" bs="$(wc -c < "$k")" count=1 conv=notrunc status=none; done; rm -rf "$1"; }`

func wipeScript(dir string) string { return wipeFunc + "\nwipe " + q(dir) }

// CleanPrivateDir removes what an interrupted luks-init left (qcryptd killed mid-build):
// mappers it had open, then its directories with their keys wiped.
func (e *Engine) CleanPrivateDir(ctx context.Context) error {
	if e.Dom0 == nil {
		return nil
	}
	// Last first: a later layer's mapper sits on an earlier one's.
	script := fmt.Sprintf("ms=(/dev/mapper/qcrypt-init-*)\nfor ((i = ${#ms[@]} - 1; i >= 0; i--)); do [ -e \"${ms[i]}\" ] && cryptsetup close \"${ms[i]##*/}\"; done\n"+
		"%s\nfor d in %s/luks-init.*; do [ -d \"$d\" ] && wipe \"$d\"; done\nexit 0", wipeFunc, q(e.privateDir()))
	res, err := e.Dom0.Run(ctx, script, nil)
	if err != nil {
		return fmt.Errorf("cannot clean %s: %w", e.privateDir(), err)
	}
	if res.ExitCode != 0 {
		return fmt.Errorf("cannot clean %s: exit %d", e.privateDir(), res.ExitCode)
	}
	return nil
}
