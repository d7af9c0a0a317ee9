package qubessim

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"

	"github.com/qcrypt/qcrypt/qubessim/memkernel"
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
	return memkernel.WriteContainer(filepath.Join(usb.root, DemoContainer), DemoSize, [][]byte{keys["mediator"], keys["work"]}, "ext4")
}
