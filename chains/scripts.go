package chains

import (
	"fmt"
	"path"
	"regexp"
	"strconv"
	"strings"

	"github.com/qcrypt/qcrypt/qubes"
)

// Scripts sent to qubes. Every value is quoted with q(); values are validated before
// (key ids, paths, allow-listed options, tokens from the Admin API), so quoting is the
// second line of defence, not the first. Results come back as exit codes (the status
// of many chains as numbered exit codes, one per line); where a device name has to come
// back, it is checked against a strict pattern.

// q quotes s for a POSIX shell.
func q(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

var plainWordRE = regexp.MustCompile(`^[A-Za-z0-9_@%+=:,./-]+$`)

// ShellWord quotes s for a command line a user may copy: as it is when it holds only
// characters no shell treats specially, else in single quotes.
func ShellWord(s string) string {
	if plainWordRE.MatchString(s) {
		return s
	}
	return q(s)
}

func qargs(args []string) string {
	out := make([]string, len(args))
	for i, a := range args {
		out[i] = q(a)
	}
	return strings.Join(out, " ")
}

// Exit codes of the open scripts (0..124; 125..127 are qrexec's).
const (
	exitLoopCreated   = 0
	exitLoopReused    = 1 // +2 when the source device was mounted by this script
	exitSourceMounted = 2
	exitSrcMkdir      = 30
	exitSrcMount      = 31
	exitNoContainer   = 32
	exitLoopFailed    = 33
	exitLocked        = 34
	exitLockFailed    = 35

	exitInjectFailed = 40
	exitNoKey        = 41
	exitMapperExists = 42
	exitNoDevice     = 43
	exitWrongKey     = 44
	exitOpenFailed   = 45
	exitNoMapperLink = 46
	exitMountFailed  = 47
	exitKeyExists    = 48
	exitFileExists   = 49
	exitWriteFailed  = 50
	exitCipher       = 51 // the layer is closed again: it does not decrypt with an allowed cipher

	exitUmountFailed  = 60
	exitCloseFailed   = 61
	exitLoopBusy      = 62
	exitEjectFailed   = 63
	exitNotAsRecorded = 64 // a held close found the mapper elsewhere than recorded; nothing done

	statusBase = 32 // status scripts exit statusBase + bit set
)

var scriptErrors = map[int]string{
	exitSrcMkdir: "cannot create the source mount point", exitSrcMount: "cannot mount the source device",
	exitNoContainer: "the container file does not exist", exitLoopFailed: "cannot set up a loop device",
	exitLocked: ErrLocked.Error(), exitLockFailed: "cannot write or remove the lock beside the container",
	exitInjectFailed: "cannot inject the key", exitNoKey: "the key is missing (configure an injection or create it)",
	exitMapperExists: "the mapper name is already in use (partially open chain?)", exitNoDevice: "the attached device did not appear",
	exitWrongKey: "wrong key (cryptsetup: no key available with this passphrase)", exitOpenFailed: "cryptsetup open failed",
	exitNoMapperLink: "the opened mapper has no dm device", exitMountFailed: "cannot mount the plaintext",
	exitKeyExists: "a key with that id exists already (keys are never overwritten)", exitFileExists: "the file exists already (never overwritten)",
	exitWriteFailed: "cannot write the file", exitCipher: ErrCipherRefused.Error(), exitUmountFailed: "cannot unmount (still in use?)",
	exitCloseFailed: "cryptsetup close failed (still in use?)", exitLoopBusy: "cannot detach the loop device",
	exitEjectFailed: "cannot unmount the source device", exitNotAsRecorded: errNotAsRecorded.Error(),
}

func scriptError(code int) string {
	if m, ok := scriptErrors[code]; ok {
		return m
	}
	return fmt.Sprintf("unexpected exit status %d", code)
}

var (
	// The source script prints another machine's lock line first, if there is one.
	loopOutRE   = regexp.MustCompile(`^(?:lock:([^\n]{0,300})\n)?/dev/(loop[0-9]{1,4})\n$`)
	lockedOutRE = regexp.MustCompile(`^lock:([^\n]{0,300})\n$`)
	// The hop open script reports its layer's segments, then (but on the last hop) its
	// dm device.
	hopOutRE = regexp.MustCompile(`^segments:((?: [^ \n]+)*)\n(?:/dev/(dm-[0-9]{1,4})\n)?$`)
	xvdOutRE = regexp.MustCompile(`^/dev/(xvd[a-z]{1,2})\n$`)
	xvdRE    = regexp.MustCompile(`^xvd[a-z]{1,2}$`)
)

// keyPath is where a qube keeps key id k for its default user.
func keyPath(user, k string) string { return "/home/" + user + "/.qcrypt/keys/" + k }

// sourceOpenScript mounts the source device when configured, checks and writes the
// cross-machine lock (machine "": none) and sets up (or finds) the loop device of the
// container; it prints /dev/loopN.
func sourceOpenScript(c *Chain, machine string, breakLock bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "f=%s\nm=0\n", q(c.Container()))
	// fail leaves nothing behind: a source device this script mounted is unmounted.
	b.WriteString("fail() { exit \"$1\"; }\n")
	if c.SourceDevice != "" {
		fmt.Fprintf(&b, "mkdir -p %s || exit %d\n", q(c.SourceMountPoint), exitSrcMkdir)
		fmt.Fprintf(&b, "if ! findmnt -n -M %s >/dev/null 2>&1; then mount %s %s || exit %d; m=%d; fi\n",
			q(c.SourceMountPoint), q(c.SourceDevice), q(c.SourceMountPoint), exitSrcMount, exitSourceMounted)
		fmt.Fprintf(&b, "fail() { [ \"$m\" = 0 ] || umount %s; exit \"$1\"; }\n", q(c.SourceMountPoint))
	}
	fmt.Fprintf(&b, "[ -f \"$f\" ] || fail %d\n", exitNoContainer)
	b.WriteString(lockCheckScript(c, machine, breakLock))
	fmt.Fprintf(&b, "l=$(losetup -j \"$f\" | head -n 1 | cut -d: -f1)\n")
	fmt.Fprintf(&b, "if [ -n \"$l\" ]; then echo \"$l\"; exit $((m + %d)); fi\n", exitLoopReused)
	fmt.Fprintf(&b, "losetup -f --show \"$f\" || { %sfail %d; }\nexit $m", lockRemoveScript(c, machine), exitLoopFailed)
	return b.String()
}

// sourceUndoScript takes down what an interrupted source step made: its lock, the loop
// device it created (loop), the source device it mounted. "" when there is nothing.
func sourceUndoScript(c *Chain, machine, loop string, created, mounted bool) string {
	var b strings.Builder
	if lock := lockRemoveScript(c, machine); lock != "" {
		fmt.Fprintf(&b, "f=%s\n%s", q(c.Container()), lock)
	}
	if created {
		fmt.Fprintf(&b, "losetup -d %s || exit %d\n", q(loop), exitLoopBusy)
	}
	if mounted {
		fmt.Fprintf(&b, "umount %s || exit %d\n", q(c.SourceMountPoint), exitEjectFailed)
	}
	if b.Len() == 0 {
		return ""
	}
	return b.String() + "exit 0"
}

// hopOpen says what one destination qube does to open its layer.
type hopOpen struct {
	key, name, dev string // key file, mapper name, /dev/xvdX
	options        []string
	ciphers        []string // the ciphers the layer may use, in the kernel's spellings
	readOnly       bool
	injectLen      int    // >0: key bytes follow the script on stdin
	mountPoint     string // last hop only
	mountOptions   string
	printDM        bool // not the last hop: print the dm device for the next attach
}

func hopOpenScript(h hopOpen) string {
	var b strings.Builder
	fmt.Fprintf(&b, "k=%s\nname=%s\ndev=%s\n", q(h.key), q(h.name), q(h.dev))
	if h.injectLen > 0 {
		fmt.Fprintf(&b, "if [ ! -e \"$k\" ]; then\n  umask 077; mkdir -p %s || exit %d\n", q(path.Dir(h.key)), exitInjectFailed)
		fmt.Fprintf(&b, "  head -c %d > \"$k.part\" && [ \"$(wc -c < \"$k.part\")\" -eq %d ] && mv \"$k.part\" \"$k\" || { rm -f \"$k.part\"; exit %d; }\nfi\n", h.injectLen, h.injectLen, exitInjectFailed)
	} else {
		fmt.Fprintf(&b, "[ -e \"$k\" ] || exit %d\n", exitNoKey)
	}
	fmt.Fprintf(&b, "cryptsetup status \"$name\" >/dev/null 2>&1 && exit %d\n", exitMapperExists)
	fmt.Fprintf(&b, "[ -e \"$dev\" ] || exit %d\n", exitNoDevice)
	ro := ""
	if h.readOnly {
		ro = " -r"
	}
	opts := ""
	if len(h.options) > 0 {
		opts = " " + qargs(h.options)
	}
	fmt.Fprintf(&b, "cryptsetup open%s%s --key-file \"$k\" \"$dev\" \"$name\"\n", opts, ro)
	fmt.Fprintf(&b, "case $? in 0) ;; 2) exit %d;; *) exit %d;; esac\n", exitWrongKey, exitOpenFailed)
	// Nothing of a layer that does not encrypt is used or handed on.
	b.WriteString("printf 'segments:'\n")
	b.WriteString(segmentsScript(1, h.ciphers))
	fmt.Fprintf(&b, "echo\n[ \"$ok\" = 1 ] || { cryptsetup close \"$name\"; exit %d; }\n", exitCipher)
	if h.printDM {
		fmt.Fprintf(&b, "readlink -f \"/dev/mapper/$name\" || { cryptsetup close \"$name\"; exit %d; }", exitNoMapperLink)
	}
	if h.mountPoint != "" {
		fmt.Fprintf(&b, "mkdir -p %s && mount%s -o %s \"/dev/mapper/$name\" %s || { cryptsetup close \"$name\"; exit %d; }", q(h.mountPoint), ro, q(h.mountOptions), q(h.mountPoint), exitMountFailed)
	}
	return b.String()
}

// hopCloseScript unmounts everything of the mapper and closes it; it prints the device
// the mapper was on (/dev/xvdX) when it was open. Not open is success; with on set (a
// held close), the mapper must be open on that device, or nothing is done and it exits
// exitNotAsRecorded.
func hopCloseScript(name, on string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "name=%s\n", q(name))
	if on == "" {
		fmt.Fprintf(&b, "cryptsetup status \"$name\" >/dev/null 2>&1 || exit 0\n")
	} else {
		fmt.Fprintf(&b, "cryptsetup status \"$name\" >/dev/null 2>&1 || exit %d\n", exitNotAsRecorded)
	}
	fmt.Fprintf(&b, "d=$(cryptsetup status \"$name\" | awk '$1 == \"device:\" {print $2}')\n")
	if on != "" {
		fmt.Fprintf(&b, "[ \"$d\" = %s ] || exit %d\n", q(on), exitNotAsRecorded)
	}
	fmt.Fprintf(&b, "for t in $(findmnt -n -o TARGET -S \"/dev/mapper/$name\" | sort -r); do umount \"$t\" || exit %d; done\n", exitUmountFailed)
	fmt.Fprintf(&b, "cryptsetup close \"$name\" || exit %d\necho \"$d\"", exitCloseFailed)
	return b.String()
}

// sourceCloseScript detaches the container's loop devices, and unmounts the source
// device when eject is set.
func sourceCloseScript(c *Chain, eject bool, machine string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "f=%s\n", q(c.Container()))
	fmt.Fprintf(&b, "for l in $(losetup -j \"$f\" | cut -d: -f1); do losetup -d \"$l\" || exit %d; done\n", exitLoopBusy)
	b.WriteString(lockRemoveScript(c, machine))
	if eject && c.SourceDevice != "" {
		fmt.Fprintf(&b, "if findmnt -n -M %s >/dev/null 2>&1; then umount %s || exit %d; fi\n", q(c.SourceMountPoint), q(c.SourceMountPoint), exitEjectFailed)
	}
	b.WriteString("exit 0")
	return b.String()
}

// Status bits of a destination qube. Where the mapper sits is a two-bit field, so that
// every fact fits below qrexec's reserved statuses (statusBase + 63 < 125).
const (
	bitKey     = 1
	posShift   = 1  // (bits >> posShift) & 3: where the mapper sits, pos* below
	useShift   = 3  // (bits >> useShift) & 3: what uses the mapper, use* below
	bitHopBusy = 32 // a device attached from the previous hop carries another mapper
)

// What uses a destination's mapper.
const (
	useNone      = 0 // nothing
	usePassedOn  = 1 // in use, not mounted: passed on to the next qube
	useMounted   = 2 // mounted, not at the chain's mount point
	useMountedAt = 3 // mounted at the chain's mount point
)

// Where a destination's mapper sits.
const (
	posNone  = 0 // no mapper of that name
	posHop   = 1 // on a device attached from the chain's previous hop
	posOther = 2 // on a device attached from elsewhere: another chain
	posLoose = 3 // on a device not attached now (its backend went away)
)

// Source status exit codes.
const (
	srcLoop    = statusBase + 8
	srcNoLoop  = statusBase + 9
	srcMissing = statusBase + 10
)

func sourceStatusScript(c *Chain) string {
	var b strings.Builder
	fmt.Fprintf(&b, "f=%s\n", q(c.Container()))
	if c.SourceDevice != "" {
		fmt.Fprintf(&b, "findmnt -n -M %s >/dev/null 2>&1 || exit %d\n", q(c.SourceMountPoint), srcMissing)
	}
	fmt.Fprintf(&b, "[ -f \"$f\" ] || exit %d\n", srcMissing)
	fmt.Fprintf(&b, "[ -n \"$(losetup -j \"$f\")\" ] && exit %d\nexit %d", srcLoop, srcNoLoop)
	return b.String()
}

// hopStatusScript reports a destination's facts as an exit code: statusBase + bits. It
// runs inside statusScript, which defines $all (every device attached to the qube),
// $maps (its mappers and their devices) and dev. devs are the devices attached from
// the previous hop that are the chain's, unknown those from it that cannot be told
// (their backend is down): a mapper there is neither the chain's nor another chain's.
func hopStatusScript(key, name string, devs, unknown []string, mountPoint string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "k=%s\nname=%s\nb=0\n", q(key), q(name))
	fmt.Fprintf(&b, "[ -e \"$k\" ] && b=$((b | %d))\n", bitKey)
	// One cryptsetup status per mapper: its first line says "in use", its device line
	// where it sits.
	b.WriteString("if s=$(cryptsetup status \"$name\" 2>/dev/null); then\n  d=$(dev \"$s\")\n")
	fmt.Fprintf(&b, "  p=%d\n  case $all in *\" $d \"*) p=%d;; esac\n", posLoose, posOther)
	for _, d := range unknown {
		fmt.Fprintf(&b, "  [ \"$d\" = %s ] && p=%d\n", q(d), posLoose)
	}
	for _, d := range devs {
		fmt.Fprintf(&b, "  [ \"$d\" = %s ] && p=%d\n", q(d), posHop)
	}
	fmt.Fprintf(&b, "  b=$((b | p << %d))\n", posShift)
	fmt.Fprintf(&b, "  u=%d\n  case ${s%%%%\"$nl\"*} in *'in use'*) u=%d;; esac\n", useNone, usePassedOn)
	fmt.Fprintf(&b, "  findmnt -n -S \"/dev/mapper/$name\" >/dev/null 2>&1 && u=%d\n", useMounted)
	if mountPoint != "" {
		fmt.Fprintf(&b, "  findmnt -n -S \"/dev/mapper/$name\" -M %s >/dev/null 2>&1 && u=%d\n", q(mountPoint), useMountedAt)
	}
	fmt.Fprintf(&b, "  b=$((b | u << %d))\n", useShift)
	// What the kernel runs for it, for the status to show (descriptor 3).
	b.WriteString(segmentsScript(3, nil))
	b.WriteString("fi\n")
	for _, d := range devs {
		// Another mapper on the chain's device.
		fmt.Fprintf(&b, "printf '%%s\\n' \"$maps\" | { while read -r m md; do [ \"$m\" != \"$name\" ] && [ \"$md\" = %s ] && exit 0; done; exit 1; } && b=$((b | %d))\n", q(d), bitHopBusy)
	}
	fmt.Fprintf(&b, "exit $((%d + b))", statusBase)
	return b.String()
}

// statusScript runs the status pieces of many chains in one qube, one call for all:
// each piece in its own subshell, its exit code printed as "INDEX CODE" (nothing else
// is printed). attached are the qube's attached devices; mappers says whether a piece
// needs the table of mappers, which costs one cryptsetup per mapper and is made once.
func statusScript(attached []string, mappers bool, pieces []string) string {
	var b strings.Builder
	// Not every set of pieces uses each of these.
	b.WriteString("# shellcheck disable=SC2034\nnl='\n'\n")
	b.WriteString("dev() { printf '%s\\n' \"$1\" | awk '$1 == \"device:\" {print $2}'; }\n")
	fmt.Fprintf(&b, "# shellcheck disable=SC2034\nall=%s\n# shellcheck disable=SC2034\nmaps=\n", q(" "+strings.Join(attached, " ")+" "))
	if mappers {
		b.WriteString("maps=$(for p in /dev/mapper/*; do m=${p##*/}; [ -e \"$p\" ] && [ \"$m\" != control ] || continue; " +
			"printf '%s %s\\n' \"$m\" \"$(dev \"$(cryptsetup status \"$m\" 2>/dev/null)\")\"; done)\n")
	}
	for i, p := range pieces {
		// A piece answers with its exit code; a hop piece reports its segments on 3.
		fmt.Fprintf(&b, "o=$( (\n%s\n) 3>&1 </dev/null >/dev/null 2>&1 ); printf '%%s %%s%%s\\n' %d \"$?\" \"$o\"\n", p, i)
	}
	b.WriteString("exit 0")
	return b.String()
}

// statusLineRE is one line of statusScript's answer: the piece's index, its exit code
// and the segments a hop reported.
var statusLineRE = regexp.MustCompile(`^([0-9]{1,5}) ([0-9]{1,3})((?: [^ ]+)*)$`)

// pieceAnswer is what one piece of statusScript answered.
type pieceAnswer struct {
	code     int
	segments []Segment
}

// parseStatusAnswers reads statusScript's answer for n pieces strictly: every index
// once, in order, nothing else.
func parseStatusAnswers(out []byte, n int) ([]pieceAnswer, error) {
	lines := strings.Split(strings.TrimSuffix(string(out), "\n"), "\n")
	if n == 0 && len(out) == 0 {
		return nil, nil
	}
	if len(lines) != n {
		return nil, fmt.Errorf("%d answers for %d questions", len(lines), n)
	}
	answers := make([]pieceAnswer, n)
	for i, l := range lines {
		m := statusLineRE.FindStringSubmatch(l)
		if m == nil || m[1] != strconv.Itoa(i) {
			return nil, fmt.Errorf("unexpected answer %q", qubes.Printable(l, 40))
		}
		segs, ok := parseSegments(m[3])
		if !ok {
			return nil, fmt.Errorf("unexpected answer %q", qubes.Printable(l, 80))
		}
		answers[i].code, _ = strconv.Atoi(m[2])
		answers[i].segments = segs
	}
	return answers, nil
}
