package chains

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"gopkg.in/ini.v1"
)

// ConfigError is one problem in a chain file. Line is 0 when the problem is a key that
// is missing or the whole file.
type ConfigError struct {
	File string
	Line int
	Key  string
	Msg  string
}

func (e ConfigError) Error() string {
	where := e.File // a problem of the whole file, or of a missing key, has no line
	if e.Line > 0 {
		where = fmt.Sprintf("%s:%d", e.File, e.Line)
	}
	if e.Key == "" {
		return where + ": " + e.Msg
	}
	return where + ": " + e.Key + ": " + e.Msg
}

// ConfigErrors is every problem found in one load, sorted by file and line.
type ConfigErrors []ConfigError

func (es ConfigErrors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// DefaultStartupInterval is the original's default.
const DefaultStartupInterval = 300 * time.Second

// Keys of a chain file. "destination vm/inj/opt/ciphers N" are matched by pattern.
const (
	keySourceVM         = "source vm"
	keySourceDevice     = "source device"
	keySourceMountPoint = "source mount point"
	keySourceFile       = "source file"
	keyKey              = "key"
	keyMountPoint       = "destination mount point"
	keyMountOptions     = "destination mount options"
	keyAutostart        = "autostart"
	keyReadOnly         = "read-only"
	keyType             = "type"
	keyInterval         = "startup interval"
	keyPreOpen          = "pre open command"
	keyPostOpen         = "post open command"
	keyPreClose         = "pre close command"
	keyPostClose        = "post close command"
)

var (
	hopKeyRE  = regexp.MustCompile(`^destination (vm|inj|opt|ciphers) ([1-9][0-9]{0,2})$`)
	keyLineRE = regexp.MustCompile(`^\s*([^#;=:\[][^=:]*?)\s*[=:]`)
)

// LoadTarget reads every *.ini of a target directory. It returns the chains sorted by
// name, or every problem of every file at once. asRoot (qcryptd, root's check) enforces
// that the directory, its parent (the config root) and every file are root's alone: a
// chain file chooses dom0 files to inject, hooks run as root and autostart.
func LoadTarget(dir string, asRoot bool) ([]*Chain, error) {
	if st, err := os.Stat(dir); err != nil || !st.IsDir() {
		return nil, fmt.Errorf("cannot read configuration: %s is not a directory", dir)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("cannot read configuration: %w", err)
	}
	var files []string
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".ini") {
			files = append(files, filepath.Join(dir, e.Name()))
		}
	}
	if asRoot {
		if msg := trustedDirs(dir, always); msg != "" {
			return nil, fmt.Errorf("cannot trust configuration directory %s: %s", dir, msg)
		}
	}
	sort.Strings(files)
	var errs ConfigErrors
	var chains []*Chain
	for _, f := range files {
		c, ferrs := LoadFile(f, asRoot)
		errs = append(errs, ferrs...)
		if c != nil {
			chains = append(chains, c)
		}
	}
	if len(errs) > 0 {
		sort.SliceStable(errs, func(i, j int) bool {
			if errs[i].File != errs[j].File {
				return errs[i].File < errs[j].File
			}
			return errs[i].Line < errs[j].Line
		})
		return nil, errs
	}
	return chains, nil
}

// LoadFile parses one chain file; a nil chain comes with at least one error.
func LoadFile(file string, asRoot bool) (*Chain, ConfigErrors) {
	var errs ConfigErrors
	add := func(line int, key, format string, a ...any) {
		errs = append(errs, ConfigError{File: file, Line: line, Key: key, Msg: fmt.Sprintf(format, a...)})
	}
	data, msg, err := readConfigFile(file, asRoot)
	if err != nil {
		add(0, "", "cannot read: %v", err)
		return nil, errs
	}
	if msg != "" {
		add(0, "", "cannot be trusted: %s (chain files choose dom0 files, hooks run as root)", msg)
		return nil, errs
	}
	lines, clean, scanErrs := scanKeys(file, data)
	errs = append(errs, scanErrs...)
	f, err := ini.LoadSources(ini.LoadOptions{IgnoreInlineComment: true, PreserveSurroundedQuote: true}, clean)
	if err != nil {
		add(0, "", "cannot parse: %v", err)
		return nil, errs
	}
	sec := f.Section(ini.DefaultSection)
	values := map[string]string{}
	for _, k := range sec.Keys() {
		values[k.Name()] = strings.TrimSpace(k.Value())
	}

	c := &Chain{Name: strings.TrimSuffix(filepath.Base(file), ".ini"), File: file, ReadOnly: true, StartupInterval: DefaultStartupInterval, Type: "luks"}
	hops := map[int]*Hop{}
	for key := range values {
		if m := hopKeyRE.FindStringSubmatch(key); m != nil {
			n, _ := strconv.Atoi(m[2])
			if hops[n] == nil {
				hops[n] = &Hop{}
			}
			continue
		}
		known := false
		for _, k := range plainKeys {
			known = known || k == key
		}
		if !known {
			msg := "unknown key"
			if s := suggest(key); s != "" {
				msg += fmt.Sprintf(" (did you mean %q?)", s)
			}
			add(lines[key], key, "%s", msg)
		}
	}
	absent := map[string]bool{} // keys told missing or empty: nothing more to say of them
	required := func(key string) string {
		v, ok := values[key]
		if !ok {
			add(0, key, "missing (required)")
		} else if v == "" {
			add(lines[key], key, "empty (required)")
		}
		absent[key] = v == ""
		return v
	}
	boolean := func(key string, def bool) bool {
		v, ok := values[key]
		if !ok {
			return def
		}
		b, err := parseBool(v)
		if err != nil {
			add(lines[key], key, "%q is not a boolean (true/false, yes/no, 1/0, on/off)", v)
		}
		return b
	}
	c.SourceVM = required(keySourceVM)
	c.SourceDevice = values[keySourceDevice]
	c.SourceMountPoint = values[keySourceMountPoint]
	c.SourceFile = required(keySourceFile)
	c.keyLine = lines[keyKey]
	c.Key = required(keyKey)
	c.MountPoint = values[keyMountPoint]
	c.MountOptions = values[keyMountOptions]
	c.Autostart = boolean(keyAutostart, false)
	c.ReadOnly = boolean(keyReadOnly, true)
	if v, ok := values[keyType]; ok {
		switch v {
		case "luks", "plain", "loopaes", "tcrypt":
			c.Type = v
		default:
			add(lines[keyType], keyType, "%q is not one of plain, luks, loopaes, tcrypt", v)
		}
	}
	if v, ok := values[keyInterval]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			add(lines[keyInterval], keyInterval, "%q is not a non-negative number of seconds", v)
		}
		c.StartupInterval = time.Duration(n) * time.Second
	}
	c.PreOpen, c.PostOpen, c.PreClose, c.PostClose = values[keyPreOpen], values[keyPostOpen], values[keyPreClose], values[keyPostClose]

	// Destinations 1..n without gaps; inj/opt only for existing destinations.
	nums := make([]int, 0, len(hops))
	for n := range hops {
		nums = append(nums, n)
	}
	sort.Ints(nums)
	if _, ok := values["destination vm 1"]; !ok {
		add(0, "destination vm 1", "missing (at least one destination is required)")
		absent["destination vm 1"] = true
	}
	count := 0
	numbered := true
	for _, n := range nums {
		vmKey := fmt.Sprintf("destination vm %d", n)
		vm, ok := values[vmKey]
		if !ok {
			for _, k := range []string{"inj", "opt", "ciphers"} {
				if key := fmt.Sprintf("destination %s %d", k, n); lines[key] > 0 {
					add(lines[key], key, "there is no %q", vmKey)
				}
			}
			continue
		}
		if count++; n != count {
			add(lines[vmKey], vmKey, "destinations must be numbered 1, 2, 3, ... without gaps (destination vm %d is missing)", count)
			numbered = false
		}
		h := Hop{VM: vm, Inject: values[fmt.Sprintf("destination inj %d", n)]}
		if vm == "" {
			add(lines[vmKey], vmKey, "empty")
			absent[vmKey] = true
		}
		optKey := fmt.Sprintf("destination opt %d", n)
		if opt := values[optKey]; opt != "" {
			opts, err := ParseCryptOptions(opt)
			if err != nil {
				add(lines[optKey], optKey, "%v", err)
			}
			h.Options = opts
		}
		ciphersKey := fmt.Sprintf("destination ciphers %d", n)
		if v, ok := values[ciphersKey]; ok {
			list, err := ParseCiphers(v)
			if err != nil {
				add(lines[ciphersKey], ciphersKey, "%v", err)
			}
			h.Ciphers = list
		}
		c.Hops = append(c.Hops, h)
	}

	// What the file says, checked by the rules every chain obeys. Hops are named by
	// their number only when the numbering is right.
	for _, p := range c.problems() {
		hop := hopKeyRE.MatchString(p.key)
		if !absent[p.key] && (numbered || !hop) {
			add(lines[p.key], p.key, "%s", p.msg)
		}
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return c, nil
}

// scanKeys finds the line of every key and reports what ini.v1 would accept silently
// (sections, duplicate keys) or stop at (lines that are not key=value). It returns the
// accepted lines for ini.v1 to parse, so one bad line does not hide the other errors.
func scanKeys(file string, data []byte) (map[string]int, []byte, ConfigErrors) {
	lines := map[string]int{}
	var clean bytes.Buffer
	var errs ConfigErrors
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' || line[0] == ';' {
			continue
		}
		if line[0] == '[' {
			errs = append(errs, ConfigError{File: file, Line: n, Msg: "sections are not used in chain files"})
			continue
		}
		m := keyLineRE.FindStringSubmatch(line)
		if m == nil {
			errs = append(errs, ConfigError{File: file, Line: n, Msg: "not a key=value line"})
			continue
		}
		key := strings.TrimSpace(m[1])
		if first, dup := lines[key]; dup {
			errs = append(errs, ConfigError{File: file, Line: n, Key: key, Msg: fmt.Sprintf("set twice (first on line %d)", first)})
			continue
		}
		lines[key] = n
		clean.WriteString(line)
		clean.WriteByte('\n')
	}
	return lines, clean.Bytes(), errs
}

func parseBool(v string) (bool, error) {
	switch strings.ToLower(v) {
	case "true", "yes", "1", "on":
		return true, nil
	case "false", "no", "0", "off":
		return false, nil
	}
	return false, fmt.Errorf("not a boolean")
}

// suggest returns the known key closest to a misspelt one.
func suggest(key string) string {
	best, bestD := "", 4
	cands := append([]string{"destination vm 1", "destination inj 1", "destination opt 1"}, plainKeys...)
	for _, k := range cands {
		if d := editDistance(key, k); d < bestD {
			best, bestD = k, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

// readConfigFile reads a chain file; with asRoot it reads the file it checked (opened
// without following a link, checked on the open descriptor) and says why it is not
// root's alone, if it is not.
func readConfigFile(file string, asRoot bool) (data []byte, untrusted string, err error) {
	if !asRoot {
		data, err = os.ReadFile(file)
		return data, "", err
	}
	f, untrusted, err := openTrusted(file)
	if err != nil || untrusted != "" {
		return nil, untrusted, err
	}
	defer f.Close()
	data, err = io.ReadAll(io.LimitReader(f, maxConfigFile+1))
	if err == nil && len(data) > maxConfigFile {
		err = fmt.Errorf("larger than %d bytes", maxConfigFile)
	}
	return data, "", err
}

// maxConfigFile bounds a chain file; real ones are a few hundred bytes.
const maxConfigFile = 1 << 20

// unsafeForRoot says why a file or directory could be changed by someone other than
// root, or "" when it cannot. A parent may be world-writable with the sticky bit (/tmp):
// others cannot replace root's entries in it.
func unsafeForRoot(st os.FileInfo, parent bool) string {
	sys, ok := st.Sys().(*syscall.Stat_t)
	if !ok {
		return "its owner cannot be checked"
	}
	if sys.Uid != 0 {
		return fmt.Sprintf("owned by uid %d, not root", sys.Uid)
	}
	if st.Mode()&os.ModeSymlink != 0 {
		return "a symbolic link"
	}
	sticky := st.IsDir() && st.Mode()&os.ModeSticky != 0
	if st.Mode().Perm()&0o022 != 0 && !(parent && sticky) {
		mode := st.Mode().Perm()
		if sticky {
			mode |= 0o1000
		}
		return fmt.Sprintf("group or world writable (mode %04o)", mode)
	}
	return ""
}
