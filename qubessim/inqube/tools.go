package inqube

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/qcrypt/qcrypt/qubessim/kernelcall"
)

// RunTool runs one fake block tool inside a qube sandbox. It supports the forms qcrypt's
// scripts use; any other option or form fails with "not supported by the simulator".
func RunTool(name string, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	t := &tool{name: name, stdin: stdin, stdout: stdout, stderr: stderr}
	var code int
	switch name {
	case "losetup":
		code = t.losetup(args)
	case "cryptsetup":
		code = t.cryptsetup(args)
	case "dmsetup":
		code = t.dmsetup(args)
	case "mount":
		code = t.mount(args)
	case "umount":
		code = t.umount(args)
	case "findmnt":
		code = t.findmnt(args)
	case "blockdev":
		code = t.blockdev(args)
	case "mkfs":
		code = t.mkfs("", args)
	case "mkfs.ext4":
		code = t.mkfs("ext4", args)
	case "mkfs.btrfs":
		code = t.mkfs("btrfs", args)
	case "btrfs":
		code = t.btrfs(args)
	default:
		fmt.Fprintf(stderr, "qubes-sim: unknown tool %s\n", name)
		return 127
	}
	return code
}

type tool struct {
	name           string
	stdin          io.Reader
	stdout, stderr io.Writer
}

func (t *tool) unsupported(what string) int {
	fmt.Fprintf(t.stderr, "%s: not supported by the simulator: %s\n", t.name, what)
	return 1
}

func (t *tool) call(req kernelcall.Request) (kernelcall.Response, int) {
	resp, err := kernelcall.Call(req)
	if err != nil {
		fmt.Fprintf(t.stderr, "%s: %v\n", t.name, err)
		return resp, 1
	}
	if err := syncDevNodes("", resp.Devices); err != nil {
		fmt.Fprintf(t.stderr, "%s: cannot update /dev: %v\n", t.name, err)
		return resp, 1
	}
	if resp.Warning != "" {
		fmt.Fprintln(t.stderr, resp.Warning)
	}
	if resp.Code != 0 {
		fmt.Fprintln(t.stderr, resp.Msg)
	}
	return resp, resp.Code
}

// opts is a tiny getopt: flags without value, options with value (as "-x V", "--long V"
// or "--long=V"), clustered short flags, and "--".
type opts struct {
	flags  map[string]bool
	values map[string]string
	args   []string
}

func parseOpts(argv []string, flags, valued map[string]string) (*opts, string) {
	o := &opts{flags: map[string]bool{}, values: map[string]string{}}
	for i := 0; i < len(argv); i++ {
		a := argv[i]
		switch {
		case a == "--":
			o.args = append(o.args, argv[i+1:]...)
			return o, ""
		case strings.HasPrefix(a, "--"):
			name, val, hasVal := strings.Cut(a, "=")
			if canon, ok := flags[name]; ok && !hasVal {
				o.flags[canon] = true
			} else if canon, ok := valued[name]; ok {
				if !hasVal {
					if i+1 >= len(argv) {
						return nil, "option " + name + " needs a value"
					}
					i++
					val = argv[i]
				}
				o.values[canon] = val
			} else {
				return nil, "option " + name
			}
		case strings.HasPrefix(a, "-") && len(a) > 1:
			for j := 1; j < len(a); j++ {
				name := "-" + string(a[j])
				if canon, ok := flags[name]; ok {
					o.flags[canon] = true
					continue
				}
				canon, ok := valued[name]
				if !ok {
					return nil, "option " + name
				}
				val := a[j+1:]
				if val == "" {
					if i+1 >= len(argv) {
						return nil, "option " + name + " needs a value"
					}
					i++
					val = argv[i]
				}
				o.values[canon] = val
				break
			}
		default:
			o.args = append(o.args, a)
		}
	}
	return o, ""
}

func (t *tool) losetup(argv []string) int {
	o, bad := parseOpts(argv,
		map[string]string{"-f": "find", "--find": "find", "--show": "show", "-r": "ro", "--read-only": "ro",
			"-d": "detach", "--detach": "detach", "-a": "all", "--all": "all", "-l": "list", "--list": "list",
			"-n": "noheadings", "--noheadings": "noheadings"},
		map[string]string{"-j": "assoc", "--associated": "assoc", "-O": "output", "--output": "output"})
	if o == nil {
		return t.unsupported(bad)
	}
	if out, ok := o.values["output"]; ok && out != "NAME" {
		return t.unsupported("--output " + out)
	}
	switch {
	case o.flags["detach"]:
		if len(o.args) == 0 {
			return t.unsupported("losetup -d without device")
		}
		for _, d := range o.args {
			if _, code := t.call(kernelcall.Request{Op: kernelcall.LoopDetach, Dev: d}); code != 0 {
				return code
			}
		}
		return 0
	case o.flags["find"]:
		if len(o.args) != 1 {
			return t.unsupported("losetup -f without exactly one file")
		}
		resp, code := t.call(kernelcall.Request{Op: kernelcall.LoopSetup, File: absPath(o.args[0]), RO: o.flags["ro"]})
		if code == 0 && o.flags["show"] {
			fmt.Fprintln(t.stdout, resp.Dev)
		}
		return code
	case o.values["assoc"] != "" || o.flags["all"] || o.flags["list"] || len(o.args) == 1:
		req := kernelcall.Request{Op: kernelcall.LoopList}
		if f := o.values["assoc"]; f != "" {
			req.File = absPath(f)
		}
		resp, code := t.call(req)
		if code != 0 {
			return code
		}
		found := 0
		for _, l := range resp.Loops {
			if len(o.args) == 1 && l.Dev != o.args[0] {
				continue
			}
			found++
			if o.values["output"] == "NAME" || o.flags["list"] {
				fmt.Fprintln(t.stdout, l.Dev)
			} else {
				fmt.Fprintf(t.stdout, "%s: []: (%s)\n", l.Dev, l.Backing)
			}
		}
		if len(o.args) == 1 && found == 0 {
			fmt.Fprintf(t.stderr, "losetup: %s: No such device or address\n", o.args[0])
			return 1
		}
		return 0
	}
	return t.unsupported(strings.Join(argv, " "))
}

func (t *tool) cryptsetup(argv []string) int {
	o, bad := parseOpts(argv,
		map[string]string{"-q": "batch", "--batch-mode": "batch", "-r": "ro", "--readonly": "ro",
			"--use-urandom": "", "--use-random": "", "--allow-discards": "", "-v": "", "--verbose": ""},
		map[string]string{"-d": "key-file", "--key-file": "key-file", "--type": "type", "-M": "type",
			"-c": "cipher", "--cipher": "cipher", "-s": "key-size", "--key-size": "key-size",
			"-h": "hash", "--hash": "hash", "--pbkdf": "pbkdf", "--pbkdf-memory": "pbkdf-memory",
			"--pbkdf-force-iterations": "iterations", "-i": "iter-time", "--iter-time": "iter-time",
			"--label": "label", "--sector-size": "sector-size"})
	if o == nil {
		return t.unsupported(bad)
	}
	if len(o.args) == 0 {
		fmt.Fprintln(t.stderr, "Command not specified.")
		return 1
	}
	keyBits := 0
	if v := o.values["key-size"]; v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 || n%8 != 0 {
			fmt.Fprintf(t.stderr, "Invalid key size.\n")
			return 1
		}
		keyBits = n
	}
	for _, k := range []string{"pbkdf-memory", "iterations", "iter-time", "sector-size"} {
		if v, ok := o.values[k]; ok {
			if _, err := strconv.Atoi(v); err != nil {
				fmt.Fprintf(t.stderr, "Invalid numeric value for --%s.\n", k)
				return 1
			}
		}
	}
	action, args := o.args[0], o.args[1:]
	switch action {
	case "luksFormat":
		if len(args) < 1 || len(args) > 2 {
			return t.unsupported("luksFormat arguments")
		}
		keyFile := o.values["key-file"]
		if len(args) == 2 {
			keyFile = args[1]
		}
		if !o.flags["batch"] {
			fmt.Fprintf(t.stderr, "\nWARNING!\n========\nThis will overwrite data on %s irrevocably.\n\nAre you sure? (Type 'yes' in capital letters): ", args[0])
			line, _ := bufio.NewReader(t.stdin).ReadString('\n')
			if strings.TrimSpace(line) != "YES" {
				fmt.Fprintln(t.stderr, "Operation aborted.")
				return 1
			}
		}
		key, code := t.readKey(keyFile)
		if code != 0 {
			return code
		}
		_, code = t.call(kernelcall.Request{Op: kernelcall.LuksFormat, Dev: absPath(args[0]), Key: key, Type: o.values["type"],
			Cipher: o.values["cipher"], KeyBits: keyBits, Hash: o.values["hash"], PBKDF: o.values["pbkdf"], Label: o.values["label"]})
		return code
	case "open", "luksOpen", "plainOpen", "create":
		for value, opt := range map[string]string{"pbkdf": "--pbkdf", "iterations": "--pbkdf-force-iterations", "iter-time": "--iter-time"} {
			if _, ok := o.values[value]; ok {
				// As cryptsetup 2.6: format tuning is an error with open.
				fmt.Fprintf(t.stderr, "cryptsetup: Option %s is not allowed with open action.\n", opt)
				return 1
			}
		}
		if action == "create" {
			if len(args) == 2 {
				args = []string{args[1], args[0]}
			}
			o.values["type"] = "plain"
		}
		if action == "plainOpen" {
			o.values["type"] = "plain"
		}
		if len(args) != 2 {
			return t.unsupported(action + " arguments")
		}
		typ := o.values["type"]
		plain := typ == "plain"
		if typ != "" && !plain && typ != "luks" && typ != "luks1" && typ != "luks2" {
			return t.unsupported("--type " + typ)
		}
		key, code := t.readKey(o.values["key-file"])
		if code != 0 {
			return code
		}
		_, code = t.call(kernelcall.Request{Op: kernelcall.CryptOpen, Dev: absPath(args[0]), Name: args[1], Key: key, Plain: plain,
			RO: o.flags["ro"], Cipher: o.values["cipher"], KeyBits: keyBits})
		return code
	case "close", "luksClose", "remove":
		if len(args) != 1 {
			return t.unsupported(action + " arguments")
		}
		_, code := t.call(kernelcall.Request{Op: kernelcall.CryptClose, Name: strings.TrimPrefix(args[0], "/dev/mapper/")})
		return code
	case "status":
		if len(args) != 1 {
			return t.unsupported("status arguments")
		}
		name := strings.TrimPrefix(args[0], "/dev/mapper/")
		resp, code := t.call(kernelcall.Request{Op: kernelcall.CryptStatus, Name: name})
		if code != 0 {
			return code
		}
		c := resp.Crypt
		use, mode := "", "read/write"
		if c.InUse {
			use = " and is in use"
		}
		if c.RO {
			mode = "readonly"
		}
		fmt.Fprintf(t.stdout, "/dev/mapper/%s is active%s.\n  type:    %s\n  cipher:  %s\n  keysize: %d bits\n  device:  %s\n  mode:    %s\n",
			name, use, c.Type, c.Cipher, c.KeyBits, c.Device, mode)
		return 0
	case "isLuks", "luksUUID":
		if len(args) != 1 {
			return t.unsupported(action + " arguments")
		}
		resp, err := kernelcall.Call(kernelcall.Request{Op: kernelcall.IsLuks, Dev: absPath(args[0])})
		if err != nil {
			fmt.Fprintf(t.stderr, "cryptsetup: %v\n", err)
			return 1
		}
		if resp.Code != 0 {
			if action == "luksUUID" {
				fmt.Fprintln(t.stderr, resp.Msg)
			}
			return resp.Code
		}
		if action == "luksUUID" {
			fmt.Fprintln(t.stdout, resp.UUID)
		}
		return 0
	}
	return t.unsupported("action " + action)
}

// dmsetup supports `dmsetup table [--] NAME` for a dm-crypt mapping, in the kernel's
// form: the cipher as the kernel spells it (capi:MODE(CIPHERS)-IV for a composite one,
// as cryptsetup sets up Adiantum), the key as dmsetup shows it without --showkeys (a
// LUKS2 key in the kernel keyring as ":BYTES:logon:cryptsetup:...", else zeros).
func (t *tool) dmsetup(argv []string) int {
	args := argv
	if len(args) == 3 && args[1] == "--" {
		args = []string{args[0], args[2]}
	}
	if len(args) != 2 || args[0] != "table" {
		return t.unsupported(strings.Join(argv, " "))
	}
	resp, code := t.call(kernelcall.Request{Op: kernelcall.CryptStatus, Name: strings.TrimPrefix(args[1], "/dev/mapper/")})
	if code != 0 {
		fmt.Fprintf(t.stderr, "device-mapper: table ioctl on %s failed: No such device or address\n", args[1])
		return 1
	}
	c := resp.Crypt
	cipher := c.Cipher
	if parts := strings.SplitN(cipher, "-", 3); len(parts) == 3 && strings.Contains(parts[0], ",") {
		cipher = "capi:" + parts[1] + "(" + parts[0] + ")-" + parts[2]
	}
	key := strings.Repeat("0", c.KeyBits/4)
	if c.Type == "LUKS2" {
		key = fmt.Sprintf(":%d:logon:cryptsetup:00000000-0000-0000-0000-000000000000-d0", c.KeyBits/8)
	}
	fmt.Fprintf(t.stdout, "0 %d crypt %s %s 0 202:0 32768\n", c.Sectors, cipher, key)
	return 0
}

// readKey reads a key file inside the qube ("-" or none: standard input; without a key
// file cryptsetup reads a passphrase line).
func (t *tool) readKey(path string) ([]byte, int) {
	var key []byte
	var err error
	switch path {
	case "-":
		key, err = io.ReadAll(t.stdin)
	case "":
		line, rerr := bufio.NewReader(t.stdin).ReadString('\n')
		key, err = []byte(strings.TrimSuffix(line, "\n")), rerr
		if errors.Is(rerr, io.EOF) && line != "" {
			err = nil
		}
	default:
		key, err = os.ReadFile(absPath(path))
	}
	if err != nil || len(key) == 0 {
		if path != "" && path != "-" {
			fmt.Fprintf(t.stderr, "Failed to open key file %s.\n", path)
		} else {
			fmt.Fprintln(t.stderr, "Nothing to read on input.")
		}
		return nil, 1
	}
	return key, 0
}

var mountOptions = map[string]bool{"defaults": true, "noatime": true, "relatime": true, "nodev": true, "nosuid": true, "noexec": true, "rw": true, "ro": true, "compress=zstd": true}

func (t *tool) mount(argv []string) int {
	o, bad := parseOpts(argv,
		map[string]string{"-r": "ro", "--read-only": "ro", "-w": "rw", "--rw": "rw"},
		map[string]string{"-o": "options", "--options": "options", "-t": "type", "--types": "type"})
	if o == nil {
		return t.unsupported(bad)
	}
	ro := o.flags["ro"]
	var flags []string
	for _, opt := range strings.Split(o.values["options"], ",") {
		if opt == "" {
			continue
		}
		if !mountOptions[opt] {
			return t.unsupported("mount option " + opt)
		}
		switch opt {
		case "ro":
			ro = true
		case "rw", "defaults":
		default:
			flags = append(flags, opt)
		}
	}
	if typ := o.values["type"]; typ != "" && typ != "ext4" && typ != "btrfs" && typ != "auto" {
		return t.unsupported("file system type " + typ)
	}
	switch len(o.args) {
	case 0:
		resp, code := t.call(kernelcall.Request{Op: kernelcall.Mounts})
		for _, m := range resp.Mounts {
			fmt.Fprintf(t.stdout, "%s on %s type %s (%s)\n", m.Source, m.Target, m.FSType, m.Options)
		}
		return code
	case 2:
		_, code := t.call(kernelcall.Request{Op: kernelcall.Mount, Dev: o.args[0], Target: absPath(o.args[1]), RO: ro, Flags: strings.Join(flags, ",")})
		return code
	}
	return t.unsupported("mount with one argument (no fstab in a simulated qube)")
}

func (t *tool) umount(argv []string) int {
	o, bad := parseOpts(argv, map[string]string{"-A": "", "--all-targets": "", "-R": "", "--recursive": "", "-l": "", "--lazy": ""}, nil)
	if o == nil {
		return t.unsupported(bad)
	}
	if len(o.args) == 0 {
		return t.unsupported("umount without target")
	}
	for _, a := range o.args {
		what := a
		if !strings.HasPrefix(a, "/dev/") {
			what = absPath(a)
		}
		if _, code := t.call(kernelcall.Request{Op: kernelcall.Umount, Target: what}); code != 0 {
			return code
		}
	}
	return 0
}

func (t *tool) findmnt(argv []string) int {
	o, bad := parseOpts(argv,
		map[string]string{"-n": "noheadings", "--noheadings": "noheadings", "-r": "", "--raw": ""},
		map[string]string{"-o": "output", "--output": "output", "-S": "source", "--source": "source",
			"-M": "mountpoint", "--mountpoint": "mountpoint", "-T": "target", "--target": "target"})
	if o == nil {
		return t.unsupported(bad)
	}
	if len(o.args) > 1 {
		return t.unsupported("findmnt with more than one argument")
	}
	cols := []string{"TARGET", "SOURCE", "FSTYPE", "OPTIONS"}
	if out := o.values["output"]; out != "" {
		cols = strings.Split(strings.ToUpper(out), ",")
		for _, c := range cols {
			if c != "TARGET" && c != "SOURCE" && c != "FSTYPE" && c != "OPTIONS" {
				return t.unsupported("findmnt column " + c)
			}
		}
	}
	resp, code := t.call(kernelcall.Request{Op: kernelcall.Mounts})
	if code != 0 {
		return code
	}
	var rows [][]string
	for _, m := range resp.Mounts {
		if !mountMatches(m, o) {
			continue
		}
		var row []string
		for _, c := range cols {
			row = append(row, map[string]string{"TARGET": m.Target, "SOURCE": m.Source, "FSTYPE": m.FSType, "OPTIONS": m.Options}[c])
		}
		rows = append(rows, row)
	}
	if len(rows) == 0 {
		return 1
	}
	if !o.flags["noheadings"] {
		fmt.Fprintln(t.stdout, strings.Join(cols, " "))
	}
	for _, r := range rows {
		fmt.Fprintln(t.stdout, strings.Join(r, " "))
	}
	return 0
}

func mountMatches(m kernelcall.Mounted, o *opts) bool {
	if s := o.values["source"]; s != "" && s != m.Source {
		return false
	}
	if p := o.values["mountpoint"]; p != "" && absPath(p) != m.Target {
		return false
	}
	if p := o.values["target"]; p != "" {
		p = absPath(p)
		if p != m.Target && !strings.HasPrefix(p, m.Target+"/") {
			return false
		}
	}
	if len(o.args) == 1 {
		a := o.args[0]
		if a != m.Source && absPath(a) != m.Target {
			return false
		}
	}
	return true
}

func (t *tool) blockdev(argv []string) int {
	if len(argv) != 2 {
		return t.unsupported(strings.Join(argv, " "))
	}
	resp, code := t.call(kernelcall.Request{Op: kernelcall.Blockdev, Dev: argv[1]})
	if code != 0 {
		return code
	}
	switch argv[0] {
	case "--getsize64":
		fmt.Fprintln(t.stdout, resp.Size)
	case "--getsz":
		fmt.Fprintln(t.stdout, resp.Size/512)
	case "--getro":
		if resp.RO {
			fmt.Fprintln(t.stdout, 1)
		} else {
			fmt.Fprintln(t.stdout, 0)
		}
	default:
		return t.unsupported("blockdev " + argv[0])
	}
	return 0
}

func (t *tool) mkfs(typ string, argv []string) int {
	o, bad := parseOpts(argv,
		map[string]string{"-q": "", "--quiet": "", "-F": "", "-f": "", "--force": ""},
		map[string]string{"-t": "type", "--type": "type", "-L": "label", "--label": "label"})
	if o == nil {
		return t.unsupported(bad)
	}
	if typ == "" {
		typ = o.values["type"]
		if typ == "" {
			typ = "ext2"
		}
	}
	if len(o.args) != 1 {
		return t.unsupported("mkfs without exactly one device")
	}
	_, code := t.call(kernelcall.Request{Op: kernelcall.Mkfs, Dev: o.args[0], Type: typ, Label: o.values["label"]})
	return code
}

func (t *tool) btrfs(argv []string) int {
	if len(argv) == 5 && argv[0] == "property" && argv[1] == "set" && argv[3] == "compression" {
		_, code := t.call(kernelcall.Request{Op: kernelcall.FSSet, Target: absPath(argv[2]), Compression: argv[4]})
		return code
	}
	return t.unsupported("btrfs " + strings.Join(argv, " "))
}

// ToolName returns the tool a multi-call binary was invoked as, or "".
func ToolName(argv0 string) string {
	base := filepath.Base(argv0)
	for _, t := range ToolNames {
		if t == base {
			return t
		}
	}
	return ""
}

// absPath makes a tool argument absolute against the working directory.
func absPath(p string) string {
	if filepath.IsAbs(p) {
		return filepath.Clean(p)
	}
	wd, _ := os.Getwd()
	return filepath.Join(wd, p)
}
