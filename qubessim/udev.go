package qubessim

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Expose gives a running qube a block device of its own with what its udev script
// would write to QubesDB: port, size, mode and "MODEL (LABEL)" description. It is an
// empty sparse disk (sandbox backend). Together with Unexpose it is the counterpart of
// real-qubesd's control socket (block-add, block-remove), so the same script can drive
// either server.
func (s *Sim) Expose(vmName, port string, size int64, ro bool, desc, parent string) error {
	if _, sandbox := s.World.backend.(*sandboxBackend); !sandbox || s.real != nil {
		return fmt.Errorf("cannot expose %s:%s: only the sandbox backend with the own server has bare devices", vmName, port)
	}
	dir := filepath.Join(s.cfg.Dir, "udev")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	img := filepath.Join(dir, vmName+"-"+port+".img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		return err
	}
	if err := os.Truncate(img, size); err != nil {
		return err
	}
	s.World.mu.Lock()
	defer s.World.mu.Unlock()
	vm, ok := s.World.vms[vmName]
	if !ok || !vm.running() {
		return fmt.Errorf("cannot expose a device of %s: not running", vmName)
	}
	if port == "" {
		return fmt.Errorf("cannot expose a device of %s without a port", vmName)
	}
	_, err := vm.kernel.PlugDisk(img, port, desc, parent, ro)
	return err
}

// Udev applies one line of real-qubesd's control protocol: "block-add VM PORT SIZE MODE
// DESC..." or "block-remove VM PORT".
func (s *Sim) Udev(line string) error {
	w := strings.Fields(line)
	switch {
	case len(w) >= 5 && w[0] == "block-add":
		size, err := strconv.ParseInt(w[3], 10, 64)
		if err != nil {
			return fmt.Errorf("bad size %q", w[3])
		}
		return s.Expose(w[1], w[2], size, w[4] == "r", strings.Join(w[5:], " "), "")
	case len(w) == 3 && w[0] == "block-remove":
		return s.Unplug(w[1], w[2])
	}
	return fmt.Errorf("cannot apply %q: block-add VM PORT SIZE MODE DESC or block-remove VM PORT", line)
}

// SetupRealWorld builds the world real-qubesd starts with: debian-12 (template),
// sys-usb (running, exposing sda, its partition sda1 and the read-only sdb), mediator and
// work (halted).
func (s *Sim) SetupRealWorld() error {
	for _, q := range []struct{ name, class string }{{"debian-12", "TemplateVM"}, {"sys-usb", "AppVM"}, {"mediator", "AppVM"}, {"work", "AppVM"}} {
		if _, err := s.AddVM(q.name, q.class, "user"); err != nil {
			return err
		}
	}
	if err := s.start("sys-usb"); err != nil {
		return err
	}
	for _, d := range []struct {
		port         string
		size         int64
		ro           bool
		desc, parent string
	}{
		{"sda", 16008609792, false, "Cruzer_Blade ()", ""},
		{"sda1", 16007561216, false, "Cruzer_Blade (backup)", "sda"},
		{"sdb", 31037849600, true, "DataTraveler_3.0 ()", ""},
	} {
		if err := s.Expose("sys-usb", d.port, d.size, d.ro, d.desc, d.parent); err != nil {
			return err
		}
	}
	return nil
}
