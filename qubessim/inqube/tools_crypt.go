// The fake cryptsetup and dmsetup.

package inqube

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"github.com/qcrypt/qcrypt/qubessim/kernelcall"
)

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
