package chains

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path"
	"regexp"
	"strconv"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/qcrypt/qcrypt/qubes"
)

// InitSpec describes a new container: the original's luksInit.
type InitSpec struct {
	Chain            *Chain // source qube, container path (SourceFile), key id, destinations and their options
	Size             int64  // container bytes (default 1 GiB)
	WorkDir          string // dom0 directory to build in (default /tmp); needs Size free
	KeySize          int    // key bytes (default 100)
	BackupDir        string // dom0 directory for key backups <vm>_<key> (mode 0600, never overwritten)
	FS               string // btrfs (default, zstd compression) or ext4
	KeyEntropy       string // default /dev/random
	ContainerEntropy string // default /dev/urandom
	Autostart        bool   // start halted qubes instead of refusing
}

var sizeRE = regexp.MustCompile(`^([0-9]+)([KMGT]?)$`)

// ParseSize reads sizes like 1G, 512M, 4096.
func ParseSize(s string) (int64, error) {
	m := sizeRE.FindStringSubmatch(strings.ToUpper(s))
	if m == nil {
		return 0, fmt.Errorf("size %q is not a number with an optional K, M, G or T", s)
	}
	n, err := strconv.ParseInt(m[1], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	shift := map[string]uint{"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m[2]]
	if n <= 0 || n > 1<<62>>shift {
		return 0, fmt.Errorf("size %q is out of range", s)
	}
	return n << shift, nil
}

func (s *InitSpec) defaults() error {
	if s.Size == 0 {
		s.Size = 1 << 30
	}
	if s.WorkDir == "" {
		s.WorkDir = "/tmp"
	}
	if s.KeySize == 0 {
		s.KeySize = 100
	}
	if s.FS == "" {
		s.FS = "btrfs"
	}
	if s.KeyEntropy == "" {
		s.KeyEntropy = "/dev/random"
	}
	if s.ContainerEntropy == "" {
		s.ContainerEntropy = "/dev/urandom"
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
		return fmt.Errorf("file system %q is not btrfs or ext4", s.FS)
	}
	if need := minContainerSize(c); s.Size < need {
		// Otherwise cryptsetup fails deep inside: "Requested offset is beyond real size".
		return fmt.Errorf("the container must be at least %d MiB for %d layers: a LUKS2 header takes 16 MiB", need>>20, len(c.Hops))
	}
	for _, p := range []string{s.WorkDir, s.KeyEntropy, s.ContainerEntropy} {
		if err := validatePath(p, true); err != nil {
			return err
		}
	}
	if s.BackupDir != "" {
		if err := validatePath(s.BackupDir, true); err != nil {
			return err
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
	exitBackupExist = 53
)

// LuksInit creates a container with one LUKS layer per destination (the outermost for
// destination 1) and a file system inside, in dom0; copies the keys into the
// destinations and the container into the source, with byte progress; optionally keeps
// key backups in dom0. It refuses to overwrite any file or key, and removes its dom0
// files in every case, and what it copied into qubes when it fails.
func (e *Engine) LuksInit(ctx context.Context, s InitSpec, progress ProgressFunc) (err error) {
	if err := s.defaults(); err != nil {
		return fmt.Errorf("cannot create the container: %w", err)
	}
	if e.Dom0 == nil {
		return errors.New("cannot create the container: no dom0 runner")
	}
	c := s.Chain
	log := e.log().WithFields(logrus.Fields{"chain": c.Name, "op": "luks-init"})
	steps := 4 + len(c.Hops) // check, build, one key per destination, container, done
	step := 0
	report := func(desc string, bytes, total int64) {
		if progress != nil {
			progress(Progress{Step: step, Steps: steps, Desc: desc, Bytes: bytes, Total: total})
		}
	}
	next := func(desc string) { step++; report(desc, 0, 0) }

	next("check the qubes")
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
			if !s.Autostart || st == qubes.StatePaused {
				return fmt.Errorf("cannot create the container: %w: %s (use autostart)", ErrNotRunning, vm)
			}
			if err := e.Qubes.Start(ctx, vm); err != nil {
				return fmt.Errorf("cannot start %s: %w", vm, err)
			}
		}
	}
	keyPaths := make([]string, len(c.Hops))
	for i, h := range c.Hops {
		user, err := e.user(ctx, h.VM)
		if err != nil {
			return err
		}
		keyPaths[i] = keyPath(user, c.Key)
		if err := e.expectAbsent(ctx, h.VM, keyPaths[i], exitKeyExists); err != nil {
			return err
		}
	}
	if err := e.expectAbsent(ctx, c.SourceVM, c.Container(), exitFileExists); err != nil {
		return err
	}

	next("build the container in dom0")
	res, err := e.Dom0.Run(ctx, buildScript(s), nil)
	if err != nil {
		return fmt.Errorf("cannot build the container: %w", err)
	}
	dir := strings.TrimSpace(strings.SplitN(string(res.Stdout), "\n", 2)[0])
	if strings.HasPrefix(dir, s.WorkDir+"/qcrypt-luks-init.") && validatePath(dir, true) == nil {
		defer func() {
			if _, rerr := e.Dom0.Run(context.WithoutCancel(ctx), "rm -rf "+q(dir), nil); rerr != nil {
				log.WithError(rerr).Error("cannot remove the dom0 working directory")
			}
		}()
	}
	if res.ExitCode != 0 {
		msg := scriptError(res.ExitCode)
		switch res.ExitCode {
		case exitNoSpace:
			msg = fmt.Sprintf("not enough free space in %s for %d bytes", s.WorkDir, s.Size)
		case exitBuildFailed:
			msg = "cryptsetup, losetup or mkfs failed in dom0: " + qubes.Printable(string(res.Stderr), 300)
		case exitBackupExist:
			msg = "a key backup exists already in " + s.BackupDir + " (never overwritten)"
		}
		return fmt.Errorf("cannot build the container: %s", msg)
	}

	// From here on, what is copied into qubes is removed again on failure.
	var written []struct{ vm, path string }
	defer func() {
		if err == nil {
			return
		}
		for _, w := range written {
			if _, rerr := e.Runner.Run(context.WithoutCancel(ctx), w.vm, "rm -f "+q(w.path), nil); rerr != nil {
				log.WithField("vm", w.vm).WithError(rerr).Error("cannot remove a copied file after a failure")
			}
		}
	}()
	for i, h := range c.Hops {
		next("copy the key of layer " + fmt.Sprint(i+1) + " into " + h.VM)
		if err := e.copyIn(ctx, h.VM, path.Join(dir, fmt.Sprintf("key%d", i)), keyPaths[i], int64(s.KeySize), nil); err != nil {
			return err
		}
		written = append(written, struct{ vm, path string }{h.VM, keyPaths[i]})
	}
	next("copy the container into " + c.SourceVM)
	if err := e.copyIn(ctx, c.SourceVM, path.Join(dir, "container"), c.Container(), s.Size, func(n int64) {
		report("copy the container into "+c.SourceVM, n, s.Size)
	}); err != nil {
		return err
	}
	written = append(written, struct{ vm, path string }{c.SourceVM, c.Container()})
	next("done")
	log.Info("container created")
	return nil
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

// copyIn streams a dom0 file of exactly size bytes to dst in vm (mode 0600, refusing to
// overwrite), reporting bytes as they go.
func (e *Engine) copyIn(ctx context.Context, vm, src, dst string, size int64, bytes func(int64)) error {
	f, err := e.Dom0.Open(src)
	if err != nil {
		return fmt.Errorf("cannot read %s in dom0: %w", src, err)
	}
	defer f.Close()
	var in io.Reader = io.LimitReader(f, size)
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

// buildScript makes the container in a fresh directory under the work dir (printed
// first), one LUKS layer per destination, and the file system; mappers and the loop
// device are always torn down; files stay for copying.
func buildScript(s InitSpec) string {
	c := s.Chain
	var b strings.Builder
	fmt.Fprintf(&b, "umask 077\nwd=%s\n", q(s.WorkDir))
	fmt.Fprintf(&b, "avail=$(df --output=avail -B1 \"$wd\" | tail -n 1)\n[ \"$avail\" -gt %d ] 2>/dev/null || exit %d\n", s.Size, exitNoSpace)
	if s.BackupDir != "" {
		for _, h := range c.Hops {
			fmt.Fprintf(&b, "[ -e %s ] && exit %d\n", q(path.Join(s.BackupDir, h.VM+"_"+c.Key)), exitBackupExist)
		}
	}
	fmt.Fprintf(&b, "d=$(mktemp -d \"$wd/qcrypt-luks-init.XXXXXXXX\") || exit %d\necho \"$d\"\n", exitBuildFailed)
	fmt.Fprintf(&b, "maps=''\nloop=''\ncleanup() { for m in $maps; do cryptsetup close \"$m\"; done; [ -n \"$loop\" ] && losetup -d \"$loop\"; }\ntrap cleanup EXIT\n")
	fmt.Fprintf(&b, "fail() { exit %d; }\n", exitBuildFailed)
	fmt.Fprintf(&b, "head -c %d < %s > \"$d/container\" || fail\n", s.Size, q(s.ContainerEntropy))
	fmt.Fprintf(&b, "loop=$(losetup -f --show \"$d/container\") || fail\ndev=$loop\n")
	for i, h := range c.Hops {
		fmtOpts := c.CryptArgs(i, "luksFormat")
		if !hasOption(fmtOpts, "--type") && !hasOption(fmtOpts, "--pbkdf-memory") && !hasOption(fmtOpts, "--pbkdf") {
			// LUKS2's default argon2 memory kills small qubes (cryptsetup issue 372).
			fmtOpts = append(fmtOpts, "--pbkdf-memory", "10240")
		}
		name := fmt.Sprintf("qcrypt-init-$$-%d", i)
		fmt.Fprintf(&b, "head -c %d < %s > \"$d/key%d\" || fail\n", s.KeySize, q(s.KeyEntropy), i)
		fmt.Fprintf(&b, "cryptsetup -q --key-file \"$d/key%d\" %s luksFormat \"$dev\" || fail\n", i, qargs(fmtOpts))
		fmt.Fprintf(&b, "cryptsetup open --key-file \"$d/key%d\" %s \"$dev\" \"%s\" || fail\nmaps=\"%s $maps\"\ndev=\"/dev/mapper/%s\"\n", i, qargs(c.CryptArgs(i, "open")), name, name, name)
		if s.BackupDir != "" {
			bak := path.Join(s.BackupDir, h.VM+"_"+c.Key)
			fmt.Fprintf(&b, "mkdir -p %s && cat \"$d/key%d\" > %s.part && mv %s.part %s || fail\n", q(s.BackupDir), i, q(bak), q(bak), q(bak))
		}
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
