package chains

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Chain files are root's to write: one chooses dom0 files to inject, its hooks run as
// root, and it opens chains by itself. The rule is OpenSSH's StrictModes and sudo's for
// a path: a chain file may be a symbolic link (the original's folders share a chain
// between targets so), followed, but the file it resolves to, every directory on the
// way to it, and every directory on the link's own path must be root's and not group
// or world writable. A world-writable sticky directory (/tmp) is allowed above the
// configuration directory on the file's own path, as for a config root under /tmp,
// never on the way a link leads.

// trustedDirs says why dir, or a directory above it, could be changed by someone other
// than root ("" when none can). A world-writable sticky directory above dir is allowed
// where sticky says so; dir itself never is one.
func trustedDirs(dir string, sticky func(d string) bool) string {
	resolved, err := realPath(dir)
	if err != nil {
		return fmt.Sprintf("cannot resolve %s: %v", dir, err)
	}
	for d, first := resolved, true; ; d, first = filepath.Dir(d), false {
		st, err := os.Lstat(d)
		if err != nil {
			return fmt.Sprintf("cannot check %s: %v", d, err)
		}
		if msg := unsafeForRoot(st, !first && sticky(d)); msg != "" {
			return fmt.Sprintf("%s is %s", d, msg)
		}
		if d == filepath.Dir(d) {
			return ""
		}
	}
}

func always(string) bool { return true }

// openTrusted opens a chain file for root by the rule above. It returns the open file,
// or why the file cannot be trusted (naming the link and the offending component).
func openTrusted(file string) (f *os.File, untrusted string, err error) {
	dir, err := realPath(filepath.Dir(file))
	if err != nil {
		return nil, "", err
	}
	if msg := trustedDirs(dir, always); msg != "" {
		return nil, msg, nil
	}
	resolved, err := realPath(file)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		target, _ := os.Readlink(file)
		return nil, fmt.Sprintf("it is a symbolic link to %s, which does not exist", target), nil
	case err != nil && strings.HasSuffix(err.Error(), "too many links"):
		return nil, "it is a symbolic link in a loop of links", nil
	case err != nil:
		return nil, "", err
	}
	linked := resolved != filepath.Join(dir, filepath.Base(file))
	if linked {
		// Where the link leads, a sticky directory is allowed only where it is above the
		// link's own directory too.
		above := func(d string) bool { return d == "/" || strings.HasPrefix(dir, d+"/") }
		if msg := trustedDirs(filepath.Dir(resolved), above); msg != "" {
			return nil, fmt.Sprintf("it links to %s, and %s", resolved, msg), nil
		}
	}
	// Checked on the descriptor read, so nothing can be swapped in between.
	f, err = os.OpenFile(resolved, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, "", err
	}
	st, err := f.Stat()
	if err == nil && !st.Mode().IsRegular() {
		untrusted = "it is not a regular file"
	} else if err == nil {
		untrusted = unsafeForRoot(st, false)
	}
	if err != nil || untrusted != "" {
		f.Close()
		if linked && untrusted != "" {
			untrusted = fmt.Sprintf("it links to %s, which is %s", resolved, untrusted)
		}
		return nil, untrusted, err
	}
	return f, "", nil
}

// realPath is the absolute path with every link resolved.
func realPath(p string) (string, error) {
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	return filepath.EvalSymlinks(abs)
}
