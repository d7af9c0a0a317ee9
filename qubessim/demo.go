package qubessim

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
)

// Demo world facts.
const (
	DemoContainer = "/home/user/demo.luks"
	DemoKey       = "demo"
	DemoSize      = 8 << 20
)

// DemoChain is the chain file that opens the demo world's container, with extra lines
// appended (a test's "startup interval=0"). make demo writes it (qubes-sim demo-chain),
// and the tests start from it.
func DemoChain(extra ...string) string {
	s := "source vm=sys-usb\nsource file=" + DemoContainer + "\nkey=" + DemoKey + "\n" +
		"destination vm 1=mediator\ndestination vm 2=work\ndestination mount point=/mnt/demo\n"
	for _, l := range extra {
		s += l + "\n"
	}
	return s
}

// SetupDemo builds the demo world: sys-usb (running), mediator and work (halted), all
// with default user "user", and a ready 2-layer container: DemoContainer in sys-usb,
// outer layer keyed by mediator's ~/.qcrypt/keys/demo, inner by work's, ext4 inside.
// With a real qubesd the qubes are made and started through its Admin API.
func (s *Sim) SetupDemo() error {
	if s.real != nil {
		if err := s.real.demoQubes(); err != nil {
			return err
		}
	} else {
		for _, q := range []struct{ name, class string }{{"sys-usb", "DispVM"}, {"mediator", "AppVM"}, {"work", "AppVM"}} {
			if _, err := s.AddVM(q.name, q.class, "user"); err != nil {
				return err
			}
		}
		if err := s.start("sys-usb"); err != nil {
			return err
		}
	}
	usb, _ := s.VM("sys-usb")
	keys := map[string][]byte{}
	for _, q := range []string{"mediator", "work"} {
		key := make([]byte, 64)
		rand.Read(key)
		keys[q] = key
		vm, _ := s.VM(q)
		p := filepath.Join(vm.root, "home/user/.qcrypt/keys", DemoKey)
		if err := os.WriteFile(p, key, 0o400); err != nil {
			return fmt.Errorf("cannot write demo key: %w", err)
		}
	}
	return buildContainer(filepath.Join(usb.root, DemoContainer), DemoSize, [][]byte{keys["mediator"], keys["work"]}, "ext4")
}

// buildContainer writes a container file with one LUKS2 layer per key (outermost first)
// and a file system inside.
func buildContainer(path string, size int64, layerKeys [][]byte, fsType string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o644)
	if err != nil {
		return fmt.Errorf("cannot create container: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	f.Close()
	fio, err := newFileIO(path, false)
	if err != nil {
		return err
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
	f, err := os.OpenFile(image, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	f.Close()
	fio, err := newFileIO(image, false)
	if err != nil {
		return err
	}
	defer fio.f.Close()
	return writeFS(fio, fsMeta{Type: "ext4", UUID: newUUID(), Label: label}, dir)
}
