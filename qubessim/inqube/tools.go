package inqube

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
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
