// Package memkernel is the block layer of a simulated qube on the sandbox backend, in
// memory: loop devices over files in the qube's tree, dm-crypt mappings of the
// simulator's own LUKS format, devices attached from other qubes, plugged disks, and
// mounts that unpack a file system image into the qube's tree and pack it back at
// umount. The fake tools reach it through kernelcall; the world through Host and the
// methods in world.go. It holds no lock: the world calls it with its own held.
package memkernel

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// Kernel is the block layer of one qube: its loop, device-mapper, attached (xvdX) and
// plugged (sdX) devices and its mounts. Every method runs with the world's lock held.
type Kernel struct {
	host   Host
	devs   map[string]*bdev
	mounts []*mountEntry
}

// Host is the world around one qube's kernel; it is called with the world's lock held.
type Host interface {
	Name() string                  // the qube's name, for messages
	Root() string                  // the qube's tree on the host
	StashDir() string              // where a mount point's contents wait while it is mounted
	AttachedTo(port string) string // the qube a device of this one is attached to, or ""
	DeviceAdded()                  // an exposed device appeared
	DeviceRemoved(port string)     // an exposed device went away
}

type devKind int

const (
	kindLoop devKind = iota
	kindDM
	kindXVD
	kindDisk
)

// bdev is one block device node of a qube.
type bdev struct {
	name string // loop0, dm-0, xvdi, sda
	kind devKind
	io   blockIO
	ro   bool

	backing   string // loop: file path inside the qube
	file      *fileIO
	autoclear bool // loop: detach requested while busy

	mapper    string // dm: /dev/mapper name
	under     *bdev  // dm: backing device
	cryptType string // dm: LUKS1, LUKS2, PLAIN
	cipher    string
	keyBits   int

	link func() (stale, ro bool) // xvd: the state of the attachment it comes from

	diskDesc string // disk: "MODEL (LABEL)"
	parent   string // disk: the disk a partition is on
	diskPath string // disk: host image file
}

func (b *bdev) desc() string {
	switch b.kind {
	case kindLoop:
		return b.backing
	case kindDM:
		return b.mapper
	case kindDisk:
		return b.diskDesc
	}
	return ""
}

// exposed reports whether the qube's udev scripts publish the device to qubesd: loop,
// dm and disks are; xvd devices (which came from another qube) are not.
func (b *bdev) exposed() bool { return b.kind != kindXVD }

type mountEntry struct {
	dev    *bdev
	target string // path inside the qube
	ro     bool
	flags  string // the other mount options, as given
	meta   fsMeta
	stash  string // host path holding what the mount point contained before
}

// toolError is a failure with the exit status and message of the real tool.
type toolError struct {
	code int
	msg  string
}

func (e *toolError) Error() string { return e.msg }

func fail(code int, format string, a ...any) error {
	return &toolError{code: code, msg: fmt.Sprintf(format, a...)}
}

// New is the kernel of a qube that has no devices yet.
func New(host Host) *Kernel {
	return &Kernel{host: host, devs: map[string]*bdev{}}
}

// hostPath maps an absolute path inside the qube to the host, refusing paths that leave
// the qube's tree or pass through a symlink (a qube could aim one at the host).
func (k *Kernel) hostPath(p string) (string, error) {
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("%s: path must be absolute", p)
	}
	clean := filepath.Clean(p)
	cur := k.host.Root()
	for _, part := range strings.Split(strings.TrimPrefix(clean, "/"), "/") {
		if part == "" {
			continue
		}
		cur = filepath.Join(cur, part)
		if st, err := os.Lstat(cur); err == nil && st.Mode()&os.ModeSymlink != 0 {
			return "", fmt.Errorf("%s: not supported by the simulator: symlink in path", p)
		}
	}
	return cur, nil
}

// resolve finds the device a path names.
func (k *Kernel) resolve(p string) (*bdev, error) {
	switch {
	case strings.HasPrefix(p, "/dev/mapper/"):
		name := strings.TrimPrefix(p, "/dev/mapper/")
		for _, b := range k.devs {
			if b.kind == kindDM && b.mapper == name {
				return b, nil
			}
		}
	case strings.HasPrefix(p, "/dev/disk/by-uuid/"), strings.HasPrefix(p, "/dev/disk/by-label/"):
		byUUID := strings.HasPrefix(p, "/dev/disk/by-uuid/")
		want := p[strings.LastIndexByte(p, '/')+1:]
		for _, b := range k.sortedDevs() {
			if meta, _, err := readFSMeta(b.io); err == nil && (byUUID && meta.UUID == want || !byUUID && meta.Label == want && want != "") {
				return b, nil
			}
			if h, err := readLUKS(b.io); err == nil && (byUUID && h.UUID == want || !byUUID && h.Label == want && want != "") {
				return b, nil
			}
		}
	case strings.HasPrefix(p, "/dev/"):
		if b, ok := k.devs[strings.TrimPrefix(p, "/dev/")]; ok {
			return b, nil
		}
	}
	return nil, fail(4, "Device %s does not exist or access denied.", p)
}

func (k *Kernel) sortedDevs() []*bdev {
	out := make([]*bdev, 0, len(k.devs))
	for _, b := range k.devs {
		out = append(out, b)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// busy reports who holds a device: a mount, a dm mapping on top, or another qube.
func (k *Kernel) busy(b *bdev) string {
	for _, m := range k.mounts {
		if m.dev == b {
			return "mounted on " + m.target
		}
	}
	for _, d := range k.devs {
		if d.under == b {
			return "used by " + d.mapper
		}
	}
	if to := k.host.AttachedTo(b.name); to != "" {
		return "attached to " + to
	}
	return ""
}

func (k *Kernel) nextName(prefix string) string {
	for i := 0; ; i++ {
		n := prefix + strconv.Itoa(i)
		if _, ok := k.devs[n]; !ok {
			return n
		}
	}
}

func (k *Kernel) add(b *bdev) {
	k.devs[b.name] = b
	if b.exposed() {
		k.host.DeviceAdded()
	}
}

func (k *Kernel) remove(b *bdev) {
	delete(k.devs, b.name)
	if b.file != nil && b.kind == kindLoop {
		b.file.f.Close()
	}
	if b.exposed() {
		k.host.DeviceRemoved(b.name)
	}
	// A loop detached lazily goes away with its last user.
	if b.under != nil && b.under.autoclear && k.busy(b.under) == "" {
		k.remove(b.under)
	}
}

// loopSetup binds a file to the first free loop device.
func (k *Kernel) loopSetup(file string, ro bool) (*bdev, error) {
	hp, err := k.hostPath(file)
	if err != nil {
		return nil, fail(1, "losetup: %v", err)
	}
	fio, err := newFileIO(hp, ro)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fail(1, "losetup: %s: failed to set up loop device: No such file or directory", file)
		}
		return nil, fail(1, "losetup: %s: failed to set up loop device: %v", file, err)
	}
	b := &bdev{name: k.nextName("loop"), kind: kindLoop, io: fio, file: fio, ro: ro, backing: filepath.Clean(file)}
	k.add(b)
	return b, nil
}

// loopDetach detaches a loop device; a busy one is detached when its last user goes
// (the kernel's autoclear), as losetup -d does.
func (k *Kernel) loopDetach(dev string) error {
	b, err := k.resolve(dev)
	if err != nil || b.kind != kindLoop {
		return fail(1, "losetup: %s: detach failed: No such device or address", dev)
	}
	if k.busy(b) != "" {
		b.autoclear = true
		return nil
	}
	k.remove(b)
	return nil
}

// cryptOpen maps dev to /dev/mapper/name.
func (k *Kernel) cryptOpen(dev, name string, key []byte, plain bool, ro bool, cipher string, keyBits int) (*bdev, error) {
	if err := validMapperName(name); err != nil {
		return nil, err
	}
	under, err := k.resolve(dev)
	if err != nil {
		return nil, err
	}
	for _, b := range k.devs {
		if b.kind == kindDM && b.mapper == name {
			return nil, fail(5, "Device %s already exists.", name)
		}
	}
	if who := k.busy(under); who != "" {
		return nil, fail(5, "Cannot use device %s which is in use (already mapped or mounted).", dev)
	}
	b := &bdev{name: k.nextName("dm-"), kind: kindDM, mapper: name, under: under, ro: ro || under.ro}
	if attRO(under) {
		b.ro = true
	}
	var vk []byte
	if plain {
		vk = plainKey(key)
		b.cryptType, b.cipher, b.keyBits = "PLAIN", cipher, keyBits
		if b.cipher == "" {
			b.cipher = "aes-cbc-essiv:sha256"
		}
		if b.keyBits == 0 {
			b.keyBits = 256
		}
		cio, err := newCryptIO(under.io, vk)
		if err != nil {
			return nil, fail(1, "%v", err)
		}
		b.io = cio
	} else {
		h, err := readLUKS(under.io)
		if err != nil {
			if errors.Is(err, errNotLUKS) {
				return nil, fail(1, "Device %s is not a valid LUKS device.", dev)
			}
			return nil, fail(1, "Cannot read device %s.", dev)
		}
		vk, err = h.unlock(key)
		if err != nil {
			return nil, fail(2, "No key available with this passphrase.")
		}
		b.cryptType, b.cipher, b.keyBits = fmt.Sprintf("LUKS%d", h.Version), h.Cipher, h.KeyBits
		cio, err := newCryptIO(&sliceIO{under: under.io, off: luksHeaderSize, size: under.io.Size() - luksHeaderSize}, vk)
		if err != nil {
			return nil, fail(1, "%v", err)
		}
		b.io = cio
	}
	if b.ro {
		b.io = readOnlyIO{b.io}
	}
	k.add(b)
	return b, nil
}

func attRO(b *bdev) bool {
	if b.kind != kindXVD {
		return false
	}
	_, ro := b.link()
	return ro
}

// readOnlyIO refuses writes.
type readOnlyIO struct{ blockIO }

func (readOnlyIO) WriteAt([]byte, int64) (int, error) { return 0, errReadOnly }

var errReadOnly = errors.New("read-only file system")

func (k *Kernel) cryptClose(name string) error {
	for _, b := range k.devs {
		if b.kind == kindDM && b.mapper == name {
			if who := k.busy(b); who != "" {
				return fail(5, "Device %s is still in use.", name)
			}
			k.remove(b)
			return nil
		}
	}
	return fail(4, "Device %s is not active.", name)
}

func (k *Kernel) dmByName(name string) *bdev {
	for _, b := range k.devs {
		if b.kind == kindDM && b.mapper == name {
			return b
		}
	}
	return nil
}

func validMapperName(name string) error {
	if name == "" || len(name) > 127 || strings.ContainsAny(name, "/\x00") || name == "." || name == ".." || name == "control" {
		return fail(1, "Device name %q is not valid.", name)
	}
	return nil
}

// mount unpacks the file system of dev at target. The tree is written back to the
// device by umount (or a clean shutdown of the qube).
func (k *Kernel) mount(dev, target string, ro bool, flags string) (warning string, err error) {
	b, err := k.resolve(dev)
	if err != nil {
		return "", fail(32, "mount: %s: special device %s does not exist.", target, dev)
	}
	hp, err := k.hostPath(target)
	if err != nil {
		return "", fail(32, "mount: %v", err)
	}
	st, err := os.Stat(hp)
	if err != nil || !st.IsDir() {
		return "", fail(32, "mount: %s: mount point does not exist.", target)
	}
	for _, m := range k.mounts {
		if m.dev == b {
			return "", fail(32, "mount: %s: %s already mounted on %s.", target, dev, m.target)
		}
		if m.target == filepath.Clean(target) {
			return "", fail(32, "mount: %s: not supported by the simulator: mounting over a mount point.", target)
		}
	}
	if k.busy(b) != "" {
		return "", fail(32, "mount: %s: %s already in use.", target, dev)
	}
	if _, _, err := readFSMeta(b.io); err != nil {
		return "", fail(32, "mount: %s: wrong fs type, bad option, bad superblock on %s, missing codepage or helper program, or other error.", target, dev)
	}
	if !ro && (b.ro || attRO(b)) {
		ro = true
		warning = fmt.Sprintf("mount: %s: WARNING: source write-protected, mounted read-only.", target)
	}
	stash, err := os.MkdirTemp(k.host.StashDir(), "stash-")
	if err != nil {
		return "", fail(32, "mount: %v", err)
	}
	if err := moveContents(hp, stash); err != nil {
		return "", fail(32, "mount: %v", err)
	}
	meta, err := readFS(b.io, hp)
	if err != nil {
		clearDir(hp)
		if merr := moveContents(stash, hp); merr != nil {
			return "", fail(32, "mount: %s: cannot read file system: %v; cannot restore %s: %v", target, err, target, merr)
		}
		os.Remove(stash)
		return "", fail(32, "mount: %s: cannot read file system: %v", target, err)
	}
	k.mounts = append(k.mounts, &mountEntry{dev: b, target: filepath.Clean(target), ro: ro, flags: flags, meta: meta, stash: stash})
	return warning, nil
}

// umount finds a mount by target or source.
func (k *Kernel) umount(what string, flush bool) error {
	for i, m := range k.mounts {
		if m.target == filepath.Clean(what) || "/dev/"+m.dev.name == what || m.dev.kind == kindDM && "/dev/mapper/"+m.dev.mapper == what {
			if err := k.unmount(m, flush); err != nil {
				return err
			}
			k.mounts = append(k.mounts[:i], k.mounts[i+1:]...)
			return nil
		}
	}
	return fail(32, "umount: %s: not mounted.", what)
}

func (k *Kernel) unmount(m *mountEntry, flush bool) error {
	hp, err := k.hostPath(m.target)
	if err != nil {
		return fail(32, "umount: %v", err)
	}
	if flush && !m.ro {
		if err := writeFS(m.dev.io, m.meta, hp); err != nil {
			return fail(32, "umount: %s: cannot write back: %v", m.target, err)
		}
	}
	clearDir(hp)
	if err := moveContents(m.stash, hp); err != nil {
		return fail(32, "umount: %s: cannot restore the mount point: %v", m.target, err)
	}
	os.Remove(m.stash)
	return nil
}

// mountsAt returns the mounts whose device is b.
func (k *Kernel) mountOf(b *bdev) *mountEntry {
	for _, m := range k.mounts {
		if m.dev == b {
			return m
		}
	}
	return nil
}

func moveContents(from, to string) error {
	ents, err := os.ReadDir(from)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if err := os.Rename(filepath.Join(from, e.Name()), filepath.Join(to, e.Name())); err != nil {
			return err
		}
	}
	return nil
}

func clearDir(dir string) {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		os.RemoveAll(filepath.Join(dir, e.Name()))
	}
}
