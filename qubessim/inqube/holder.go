package inqube

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/qcrypt/qcrypt/qubessim/internal/sysblock"
	"golang.org/x/sys/unix"
)

// QubeHolder is the long-lived process of a qube of the kernel backend (qubes-sim
// qube-holder ROOT TOOLS NAME). The simulator starts it in new mount, UTS, IPC and
// network namespaces; it makes ROOT the namespace's root (host /usr and /etc read-only,
// private /dev, /proc, /sys, /run), says "ready" and lives until its stdin closes.
func QubeHolder(args []string) int {
	if len(args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: qubes-sim qube-holder ROOT TOOLS NAME")
		return 2
	}
	if err := setupQubeRoot(args[0], args[1], args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "qubes-sim qube-holder:", err)
		return 1
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin) // held until the simulator closes it or dies
	return 0
}

func setupQubeRoot(root, tools, name string) error {
	steps := []struct {
		what string
		do   func() error
	}{
		{"make mounts private", func() error { return unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, "") }},
		{"set the host name", func() error { return unix.Sethostname([]byte(name)) }},
		{"bind the root", func() error { return unix.Mount(root, root, "", unix.MS_BIND, "") }},
		{"bind the system", func() error { return bindSystem(root) }},
		{"mount /dev", func() error { return makeDev(filepath.Join(root, "dev")) }},
		{"mount /proc", func() error { return mountAt(root, "/proc", "proc", 0, "") }},
		{"mount /sys", func() error { return mountAt(root, "/sys", "sysfs", unix.MS_RDONLY, "") }},
		{"mount /run", func() error { return mountAt(root, "/run", "tmpfs", 0, "mode=0755") }},
		{"bind the tools", func() error { return bindRO(tools, filepath.Join(root, ToolsDir)) }},
		{"enter the root", func() error { return pivot(root) }},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			return fmt.Errorf("cannot %s: %w", s.what, err)
		}
	}
	return nil
}

func mountAt(root, dir, fstype string, flags uintptr, data string) error {
	p := filepath.Join(root, dir)
	if err := os.MkdirAll(p, 0o755); err != nil {
		return err
	}
	return unix.Mount(fstype, p, fstype, flags, data)
}

func bindRO(src, dst string) error {
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return err
	}
	if err := unix.Mount(src, dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return err
	}
	return unix.Mount("", dst, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, "")
}

// bindSystem gives the qube the host's programs read-only, as a template does.
func bindSystem(root string) error {
	dirs, links := HostSystem()
	for _, d := range append([]string{"usr", "etc"}, dirs...) {
		if err := bindRO("/"+d, filepath.Join(root, d)); err != nil {
			return err
		}
	}
	return LinkSystem(root, links)
}

// makeDev mounts a private /dev with the nodes the block tools need. Loop nodes exist
// for every number (the loop driver is global); block devices of the qube are added by
// the simulator (xvdX, sdX) and by the cryptsetup wrapper (dm-N).
func makeDev(dev string) error {
	if err := os.MkdirAll(dev, 0o755); err != nil {
		return err
	}
	if err := unix.Mount("tmpfs", dev, "tmpfs", unix.MS_NOSUID, "mode=0755"); err != nil {
		return err
	}
	for _, d := range []string{"mapper", "disk/by-uuid", "disk/by-label", "shm", "pts"} {
		if err := os.MkdirAll(filepath.Join(dev, d), 0o755); err != nil {
			return err
		}
	}
	type node struct {
		path         string
		mode         uint32
		major, minor uint32
	}
	nodes := []node{
		{"null", unix.S_IFCHR | 0o666, 1, 3}, {"zero", unix.S_IFCHR | 0o666, 1, 5}, {"full", unix.S_IFCHR | 0o666, 1, 7},
		{"random", unix.S_IFCHR | 0o666, 1, 8}, {"urandom", unix.S_IFCHR | 0o666, 1, 9}, {"tty", unix.S_IFCHR | 0o666, 5, 0},
		{"mapper/control", unix.S_IFCHR | 0o600, 10, 236}, {"loop-control", unix.S_IFCHR | 0o660, 10, 237},
	}
	for i := uint32(0); i < MaxLoopNodes; i++ {
		nodes = append(nodes, node{fmt.Sprintf("loop%d", i), unix.S_IFBLK | 0o660, 7, i})
	}
	for _, n := range nodes {
		if err := unix.Mknod(filepath.Join(dev, n.path), n.mode, int(unix.Mkdev(n.major, n.minor))); err != nil {
			return err
		}
		// Mknod honours the umask; the modes above are the ones meant.
		if err := os.Chmod(filepath.Join(dev, n.path), os.FileMode(n.mode&0o777)); err != nil {
			return err
		}
	}
	for link, target := range map[string]string{"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1", "stderr": "/proc/self/fd/2"} {
		if err := os.Symlink(target, filepath.Join(dev, link)); err != nil {
			return err
		}
	}
	return nil
}

func pivot(root string) error {
	old := filepath.Join(root, ".oldroot")
	if err := os.MkdirAll(old, 0o700); err != nil {
		return err
	}
	if err := unix.PivotRoot(root, old); err != nil {
		return err
	}
	if err := unix.Chdir("/"); err != nil {
		return err
	}
	if err := unix.Unmount("/.oldroot", unix.MNT_DETACH); err != nil {
		return err
	}
	return os.Remove("/.oldroot")
}

// cryptsetup actions whose argument is a mapping name, and where it stands (1 = the
// first argument after the action; -1 = the last of open's DEVICE NAME).
var mapperArg = map[string]int{
	"open": -1, "luksOpen": -1, "plainOpen": -1, "loopaesOpen": -1, "tcryptOpen": -1, "bitlkOpen": -1,
	"close": 1, "luksClose": 1, "remove": 1, "status": 1, "resize": 1, "refresh": 1, "luksSuspend": 1, "luksResume": 1,
}

// cryptsetup options that take a value (as a separate argument), from cryptsetup 2.6.
var cryptsetupValueOpts = map[string]bool{}

func init() {
	for _, o := range strings.Fields(`--active-name --align-payload -c --cipher --device-size -h --hash --header
		--header-backup-file --hotzone-size -I --integrity -i --iter-time --json-file --key-description -d --key-file
		-s --key-size -S --key-slot --keyfile-offset -l --keyfile-size --keyslot-cipher --keyslot-key-size --label
		--luks2-keyslots-size --luks2-metadata-size --volume-key-file --new-keyfile --new-key-slot
		--new-keyfile-offset --new-keyfile-size --new-token-id -o --offset --pbkdf --pbkdf-force-iterations
		--pbkdf-memory --pbkdf-parallel --priority --reduce-device-size --resilience --resilience-hash
		--sector-size -b --size -p --skip --subsystem -t --timeout --token-id --token-type -T --tries -M --type
		--uuid --veracrypt-pim -B --block-size --progress-frequency --master-key-file`) {
		cryptsetupValueOpts[o] = true
	}
}

var attDevRE = regexp.MustCompile(`/dev/mapper/` + regexp.QuoteMeta(AttachMapPrefix) + `[A-Za-z0-9_.-]+#(xvd[a-z]+)`)

// CryptsetupWrapper is `cryptsetup` inside a qube of the kernel backend: it runs the
// real cryptsetup with the qube's prefix on mapping names, then gives the qube the
// /dev/dm-N node and the /dev/mapper/NAME -> ../dm-N link udev would make, and shows
// the plain names in what cryptsetup prints.
func CryptsetupWrapper(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	prefix := os.Getenv(MapperPrefixEnv) + ":"
	args, action, name := prefixMapperName(args, prefix)
	var oldNode string
	if name != "" && (action == "close" || action == "luksClose" || action == "remove") {
		oldNode, _ = filepath.EvalSymlinks("/dev/mapper/" + name)
	}
	bin, err := realTool("cryptsetup")
	if err != nil {
		fmt.Fprintln(stderr, "cryptsetup:", err)
		return 1
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "DM_DISABLE_UDEV=1")
	cmd.Stdin = stdin
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err = cmd.Run()
	// The caller's pipes: if they are gone, nobody reads the output anyway.
	_, _ = io.WriteString(stdout, plainNames(out.String(), prefix))
	_, _ = io.WriteString(stderr, plainNames(errOut.String(), prefix))
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			fmt.Fprintln(stderr, "cryptsetup:", err)
			return 1
		}
		code = ee.ExitCode()
	}
	if code == 0 && name != "" {
		switch action {
		case "open", "luksOpen", "plainOpen", "loopaesOpen", "tcryptOpen", "bitlkOpen":
			if err := linkMapper(prefix+name, name); err != nil {
				fmt.Fprintln(stderr, "cryptsetup (qubes-sim):", err)
				return 1
			}
		case "close", "luksClose", "remove":
			os.Remove("/dev/mapper/" + name)
			os.Remove("/dev/mapper/" + prefix + name)
			if strings.HasPrefix(oldNode, "/dev/dm-") {
				os.Remove(oldNode)
			}
		}
	}
	return code
}

// prefixMapperName finds the cryptsetup action and the mapping name it acts on and puts
// prefix on the name (a "/dev/mapper/NAME" argument too).
func prefixMapperName(args []string, prefix string) (out []string, action, name string) {
	out = append([]string(nil), args...)
	var positional []int
	for i := 0; i < len(out); i++ {
		switch a := out[i]; {
		case cryptsetupValueOpts[a]:
			i++
		case strings.HasPrefix(a, "-"):
		default:
			positional = append(positional, i)
		}
	}
	if len(positional) == 0 {
		return out, "", ""
	}
	action = out[positional[0]]
	at := -1
	switch where, ok := mapperArg[action]; {
	case !ok:
	case where == -1 && len(positional) == 3:
		at = positional[2]
	case where == 1 && len(positional) == 2:
		at = positional[1]
	}
	if at < 0 {
		return out, action, ""
	}
	name = strings.TrimPrefix(out[at], "/dev/mapper/")
	out[at] = prefix + name
	return out, action, name
}

// plainNames shows what cryptsetup printed as the qube would see it: its own mappings
// without the prefix, attached devices as /dev/xvdX.
func plainNames(s, prefix string) string {
	s = strings.ReplaceAll(s, "/dev/mapper/"+prefix, "/dev/mapper/")
	s = attDevRE.ReplaceAllString(s, "/dev/$1")
	return strings.ReplaceAll(s, prefix, "")
}

// linkMapper replaces the node libdevmapper made for the prefixed name with what udev
// makes on a real system: /dev/dm-N and the link /dev/mapper/NAME -> ../dm-N.
func linkMapper(prefixed, name string) error {
	info, ok := sysblock.ByMapperName(prefixed)
	if !ok {
		return fmt.Errorf("cannot find the new mapping %s", name)
	}
	dm := fmt.Sprintf("dm-%d", info.Minor)
	if err := info.Mknod("/dev/" + dm); err != nil {
		return err
	}
	os.Remove("/dev/mapper/" + prefixed)
	os.Remove("/dev/mapper/" + name)
	return os.Symlink("../"+dm, "/dev/mapper/"+name)
}

// realTool finds a tool in PATH, skipping the wrappers' own directory.
func realTool(name string) (string, error) {
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		if dir == ToolsDir {
			continue
		}
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("cannot find the real %s in PATH", name)
}

// DmsetupWrapper is `dmsetup` inside a qube of the kernel backend: `dmsetup table
// [--] NAME` shows the table of the qube's own mapping NAME (QUBE:NAME in the kernel).
func DmsetupWrapper(args []string, stdout, stderr io.Writer) int {
	if len(args) == 3 && args[1] == "--" {
		args = []string{args[0], args[2]}
	}
	if len(args) != 2 || args[0] != "table" {
		fmt.Fprintf(stderr, "dmsetup: not supported by the simulator: %s\n", strings.Join(args, " "))
		return 1
	}
	bin, err := realTool("dmsetup")
	if err != nil {
		fmt.Fprintln(stderr, "dmsetup:", err)
		return 1
	}
	cmd := exec.Command(bin, "table", "--", os.Getenv(MapperPrefixEnv)+":"+strings.TrimPrefix(args[1], "/dev/mapper/"))
	cmd.Stdout, cmd.Stderr = stdout, stderr
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		fmt.Fprintln(stderr, "dmsetup:", err)
		return 1
	}
	return 0
}
