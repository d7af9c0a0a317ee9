package memkernel

import (
	"archive/tar"
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// The simulator's on-disk formats. They are not LUKS or ext4; they keep what the fakes
// need (a header that checks keys and holds the volume key; a file tree) inside the
// device bytes, so data lives in the container file, encrypted layer by layer, exactly
// where a real chain keeps it.

const (
	luksMagic      = "QSIMLUKS"
	luksHeaderSize = 16 << 10 // payload offset; real LUKS2 uses 16 MiB
	fsMagic        = "QSIMFS01"
	fsMetaMax      = 4 << 10
)

type luksHeader struct {
	Version int    `json:"version"` // 1 or 2
	UUID    string `json:"uuid"`
	Cipher  string `json:"cipher"`
	KeyBits int    `json:"key_bits"`
	Hash    string `json:"hash"`
	PBKDF   string `json:"pbkdf"`
	Label   string `json:"label,omitempty"`
	Salt    []byte `json:"salt"`
	Check   []byte `json:"check"`   // HMAC of the key-encryption key
	Wrapped []byte `json:"wrapped"` // volume key XOR key-encryption key
}

func kek(salt, passphrase []byte) []byte {
	h := sha256.New()
	h.Write(salt)
	h.Write(passphrase)
	k := h.Sum(nil)
	h.Reset()
	h.Write(k)
	return append(k, h.Sum(nil)...) // 64 bytes
}

func keyCheck(k []byte) []byte {
	m := hmac.New(sha256.New, k)
	m.Write([]byte("qubes-sim key check"))
	return m.Sum(nil)
}

func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// formatLUKS writes a fresh header for passphrase and returns it.
func formatLUKS(d blockIO, h luksHeader, passphrase []byte) error {
	if d.Size() < luksHeaderSize+4096 {
		return errors.New("device too small for a LUKS header")
	}
	vk := make([]byte, 64)
	rand.Read(vk)
	h.Salt = make([]byte, 32)
	rand.Read(h.Salt)
	k := kek(h.Salt, passphrase)
	h.Check = keyCheck(k)
	h.Wrapped = xorBytes(vk, k)
	h.UUID = newUUID()
	js, err := json.Marshal(h)
	if err != nil {
		return err
	}
	buf := make([]byte, luksHeaderSize)
	copy(buf, luksMagic)
	binary.BigEndian.PutUint32(buf[8:], uint32(len(js)))
	copy(buf[12:], js)
	_, err = d.WriteAt(buf, 0)
	return err
}

// readLUKS returns the header or an error if the device holds none.
func readLUKS(d blockIO) (*luksHeader, error) {
	if d.Size() < luksHeaderSize {
		return nil, errNotLUKS
	}
	buf, err := readFull(d, 0, luksHeaderSize)
	if err != nil {
		return nil, err
	}
	if string(buf[:8]) != luksMagic {
		return nil, errNotLUKS
	}
	n := binary.BigEndian.Uint32(buf[8:])
	if n > luksHeaderSize-12 {
		return nil, errNotLUKS
	}
	var h luksHeader
	if err := json.Unmarshal(buf[12:12+n], &h); err != nil {
		return nil, errNotLUKS
	}
	return &h, nil
}

var (
	errNotLUKS = errors.New("not a LUKS device")
	errBadKey  = errors.New("no key available with this passphrase")
	errNoFS    = errors.New("no file system")
)

// unlock returns the volume key for passphrase.
func (h *luksHeader) unlock(passphrase []byte) ([]byte, error) {
	k := kek(h.Salt, passphrase)
	if !hmac.Equal(keyCheck(k), h.Check) || len(h.Wrapped) != len(k) {
		return nil, errBadKey
	}
	return xorBytes(h.Wrapped, k), nil
}

func xorBytes(a, b []byte) []byte {
	out := make([]byte, len(a))
	for i := range a {
		out[i] = a[i] ^ b[i%len(b)]
	}
	return out
}

// plainKey derives a plain-mode volume key from a key file (no header, no check).
func plainKey(key []byte) []byte {
	a := sha256.Sum256(append([]byte("plain:"), key...))
	b := sha256.Sum256(a[:])
	return append(a[:], b[:]...)
}

// fsMeta is the super block of the simulator's file system.
type fsMeta struct {
	Type        string `json:"type"`
	UUID        string `json:"uuid"`
	Label       string `json:"label,omitempty"`
	Compression string `json:"compression,omitempty"`
}

// writeFS stores meta and a tar of dir (nil dir: empty file system) on d.
func writeFS(d blockIO, meta fsMeta, dir string) error {
	var tarBuf bytes.Buffer
	if dir != "" {
		if err := packDir(&tarBuf, dir); err != nil {
			return err
		}
	}
	js, _ := json.Marshal(meta)
	head := make([]byte, 8+4+len(js)+8)
	copy(head, fsMagic)
	binary.BigEndian.PutUint32(head[8:], uint32(len(js)))
	copy(head[12:], js)
	binary.BigEndian.PutUint64(head[12+len(js):], uint64(tarBuf.Len()))
	if int64(len(head)+tarBuf.Len()) > d.Size() {
		return fmt.Errorf("no space left on device (%d bytes needed, %d available)", len(head)+tarBuf.Len(), d.Size())
	}
	if _, err := d.WriteAt(append(head, tarBuf.Bytes()...), 0); err != nil {
		return err
	}
	return nil
}

// readFSMeta reads the super block; errNoFS if there is none.
func readFSMeta(d blockIO) (fsMeta, int64, error) {
	head, err := readFull(d, 0, 12)
	if err != nil || string(head[:8]) != fsMagic {
		return fsMeta{}, 0, errNoFS
	}
	n := int(binary.BigEndian.Uint32(head[8:]))
	if n > fsMetaMax {
		return fsMeta{}, 0, errNoFS
	}
	rest, err := readFull(d, 12, n+8)
	if err != nil {
		return fsMeta{}, 0, errNoFS
	}
	var meta fsMeta
	if err := json.Unmarshal(rest[:n], &meta); err != nil {
		return fsMeta{}, 0, errNoFS
	}
	tarLen := int64(binary.BigEndian.Uint64(rest[n:]))
	if tarLen < 0 || 12+int64(n)+8+tarLen > d.Size() {
		return fsMeta{}, 0, errNoFS
	}
	return meta, 12 + int64(n) + 8, nil
}

// readFS unpacks the file tree of d into dir (which must exist and be empty).
func readFS(d blockIO, dir string) (fsMeta, error) {
	meta, off, err := readFSMeta(d)
	if err != nil {
		return meta, err
	}
	lenBuf, _ := readFull(d, off-8, 8)
	tarLen := int(binary.BigEndian.Uint64(lenBuf))
	data, err := readFull(d, off, tarLen)
	if err != nil {
		return meta, err
	}
	return meta, unpackDir(bytes.NewReader(data), dir)
}

func packDir(w io.Writer, dir string) error {
	tw := tar.NewWriter(w)
	err := filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if rel == "." {
			return nil
		}
		info, err := de.Info()
		if err != nil {
			return err
		}
		link := ""
		if info.Mode()&fs.ModeSymlink != 0 {
			link, _ = os.Readlink(p)
		}
		hdr, err := tar.FileInfoHeader(info, link)
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		hdr.Uname, hdr.Gname = "", ""
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if info.Mode().IsRegular() {
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = io.Copy(tw, f)
			return err
		}
		return nil
	})
	if err != nil {
		return err
	}
	return tw.Close()
}

func unpackDir(r io.Reader, dir string) error {
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		name := filepath.Clean(hdr.Name)
		if filepath.IsAbs(name) || name == ".." || strings.HasPrefix(name, "../") {
			return fmt.Errorf("bad path in file system image")
		}
		p := filepath.Join(dir, name)
		mode := os.FileMode(hdr.Mode) & os.ModePerm
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, mode|0o700); err != nil {
				return err
			}
		case tar.TypeReg:
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			f.Close()
			if err != nil {
				return err
			}
		case tar.TypeSymlink:
			if err := os.Symlink(hdr.Linkname, p); err != nil {
				return err
			}
		}
	}
}
