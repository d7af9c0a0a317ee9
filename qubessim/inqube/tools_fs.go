// The fake mount, umount and findmnt.

package inqube

import (
	"fmt"
	"strings"

	"github.com/qcrypt/qcrypt/qubessim/kernelcall"
)

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
