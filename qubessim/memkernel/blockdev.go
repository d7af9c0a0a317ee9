package memkernel

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"
)

// blockIO is the data of a simulated block device.
type blockIO interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	Size() int64
}

var errIO = syscall.EIO

// fileIO is a device backed by a host file: a loop device or a plugged disk image.
type fileIO struct {
	f    *os.File
	size int64
}

func newFileIO(path string, ro bool) (*fileIO, error) {
	flag := os.O_RDWR
	if ro {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("not a regular file")
	}
	return &fileIO{f: f, size: st.Size()}, nil
}

func (f *fileIO) ReadAt(p []byte, off int64) (int, error)  { return f.f.ReadAt(p, off) }
func (f *fileIO) WriteAt(p []byte, off int64) (int, error) { return f.f.WriteAt(p, off) }
func (f *fileIO) Size() int64                              { return f.size }

// sliceIO is a window [off, off+size) of another device.
type sliceIO struct {
	under     blockIO
	off, size int64
}

func (s *sliceIO) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > s.size {
		return 0, errIO
	}
	return s.under.ReadAt(p, s.off+off)
}

func (s *sliceIO) WriteAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > s.size {
		return 0, errIO
	}
	return s.under.WriteAt(p, s.off+off)
}

func (s *sliceIO) Size() int64 { return s.size }

// cryptIO encrypts with AES-256 in CTR mode keyed by the volume key, the counter being
// the byte offset / 16. It stands in for dm-crypt's aes-xts: what matters here is that
// ciphertext below and plaintext above differ and need the right key, not the mode.
type cryptIO struct {
	under blockIO
	block cipher.Block
}

func newCryptIO(under blockIO, volumeKey []byte) (*cryptIO, error) {
	if len(volumeKey) < 32 {
		return nil, errors.New("volume key too short")
	}
	b, err := aes.NewCipher(volumeKey[:32])
	if err != nil {
		return nil, err
	}
	return &cryptIO{under: under, block: b}, nil
}

func (c *cryptIO) xor(p []byte, off int64) {
	var iv [16]byte
	binary.BigEndian.PutUint64(iv[8:], uint64(off/16))
	stream := cipher.NewCTR(c.block, iv[:])
	skip := make([]byte, off%16)
	stream.XORKeyStream(skip, skip)
	stream.XORKeyStream(p, p)
}

func (c *cryptIO) ReadAt(p []byte, off int64) (int, error) {
	n, err := c.under.ReadAt(p, off)
	c.xor(p[:n], off)
	return n, err
}

func (c *cryptIO) WriteAt(p []byte, off int64) (int, error) {
	buf := append([]byte(nil), p...)
	c.xor(buf, off)
	return c.under.WriteAt(buf, off)
}

func (c *cryptIO) Size() int64 { return c.under.Size() }

// attachedIO is a frontend's view of a backend device; it fails once the attachment is
// stale (backend gone), like a Xen blkfront whose backend vanished.
type attachedIO struct {
	link  func() (stale, ro bool)
	under blockIO
}

func (a *attachedIO) ReadAt(p []byte, off int64) (int, error) {
	if stale, _ := a.link(); stale {
		return 0, errIO
	}
	return a.under.ReadAt(p, off)
}

func (a *attachedIO) WriteAt(p []byte, off int64) (int, error) {
	if stale, ro := a.link(); stale || ro {
		return 0, syscall.EROFS
	}
	return a.under.WriteAt(p, off)
}

func (a *attachedIO) Size() int64 { return a.under.Size() }

// readFull reads n bytes at off.
func readFull(d blockIO, off int64, n int) ([]byte, error) {
	if off < 0 || n < 0 || off+int64(n) > d.Size() {
		return nil, errIO
	}
	buf := make([]byte, n)
	if _, err := d.ReadAt(buf, off); err != nil {
		return nil, err
	}
	return buf, nil
}
