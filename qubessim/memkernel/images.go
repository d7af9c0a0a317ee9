package memkernel

import (
	"fmt"
	"os"
	"path/filepath"
)

// WriteContainer writes a container file in the simulator's formats: one LUKS2 layer
// per key (outermost first) and a file system inside.
func WriteContainer(path string, size int64, layerKeys [][]byte, fsType string) error {
	fio, err := newImage(path, size)
	if err != nil {
		return fmt.Errorf("cannot create container: %w", err)
	}
	defer fio.f.Close()
	var dev blockIO = fio
	for _, key := range layerKeys {
		h := luksHeader{Version: 2, Cipher: "aes-xts-plain64", KeyBits: 512, Hash: "sha256", PBKDF: "argon2id"}
		if err := formatLUKS(dev, h, key); err != nil {
			return err
		}
		hdr, err := readLUKS(dev)
		if err != nil {
			return err
		}
		vk, err := hdr.unlock(key)
		if err != nil {
			return err
		}
		cio, err := newCryptIO(&sliceIO{under: dev, off: luksHeaderSize, size: dev.Size() - luksHeaderSize}, vk)
		if err != nil {
			return err
		}
		dev = cio
	}
	return writeFS(dev, fsMeta{Type: fsType, UUID: newUUID()}, "")
}

// MakeDiskImage creates a "USB disk" image holding a file system with label, and in it
// the given files (path inside the file system -> content); plug it with Plug.
func MakeDiskImage(image string, size int64, label string, files map[string][]byte) error {
	dir, err := os.MkdirTemp("", "qubes-sim-disk-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	for p, data := range files {
		hp := filepath.Join(dir, filepath.Clean("/"+p))
		if err := os.MkdirAll(filepath.Dir(hp), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(hp, data, 0o644); err != nil {
			return err
		}
	}
	fio, err := newImage(image, size)
	if err != nil {
		return err
	}
	defer fio.f.Close()
	return writeFS(fio, fsMeta{Type: "ext4", UUID: newUUID(), Label: label}, dir)
}

// newImage creates a sparse file of size bytes (never over an existing one) and opens it.
func newImage(path string, size int64) (*fileIO, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	err = f.Truncate(size)
	f.Close()
	if err != nil {
		return nil, err
	}
	return newFileIO(path, false)
}
