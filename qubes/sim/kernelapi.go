package sim

import (
	"bufio"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// kernelReq is what a fake tool inside a qube asks of that qube's kernel. The qube is
// known from the socket the request came in on, never from the request.
type kernelReq struct {
	Op          string `json:"op"`
	Dev         string `json:"dev,omitempty"`
	File        string `json:"file,omitempty"`
	Name        string `json:"name,omitempty"`
	Target      string `json:"target,omitempty"`
	Key         []byte `json:"key,omitempty"`
	RO          bool   `json:"ro,omitempty"`
	Plain       bool   `json:"plain,omitempty"`
	Type        string `json:"type,omitempty"`
	Cipher      string `json:"cipher,omitempty"`
	KeyBits     int    `json:"key_bits,omitempty"`
	Hash        string `json:"hash,omitempty"`
	PBKDF       string `json:"pbkdf,omitempty"`
	Label       string `json:"label,omitempty"`
	Compression string `json:"compression,omitempty"`
	Flags       string `json:"flags,omitempty"` // mount options besides ro and rw
}

type loopInfo struct {
	Dev     string `json:"dev"`
	Backing string `json:"backing"`
	RO      bool   `json:"ro"`
}

type mountInfo struct {
	Source  string `json:"source"`
	Target  string `json:"target"`
	FSType  string `json:"fstype"`
	Options string `json:"options"`
}

type cryptInfo struct {
	Sectors int64  `json:"sectors"`
	Type    string `json:"type"`
	Cipher  string `json:"cipher"`
	KeyBits int    `json:"key_bits"`
	Device  string `json:"device"`
	RO      bool   `json:"ro"`
	InUse   bool   `json:"in_use"`
}

type kernelResp struct {
	Code    int         `json:"code"`
	Msg     string      `json:"msg,omitempty"`
	Dev     string      `json:"dev,omitempty"`
	Warning string      `json:"warning,omitempty"`
	Loops   []loopInfo  `json:"loops,omitempty"`
	Mounts  []mountInfo `json:"mounts,omitempty"`
	Crypt   *cryptInfo  `json:"crypt,omitempty"`
	Size    int64       `json:"size,omitempty"`
	RO      bool        `json:"ro,omitempty"`
	UUID    string      `json:"uuid,omitempty"`
	Devices []devNode   `json:"devices,omitempty"`
}

func (s *Sim) serveKernel(vmName string, c net.Conn) {
	defer c.Close()
	line, err := bufio.NewReaderSize(c, 1<<20).ReadBytes('\n')
	if err != nil {
		return
	}
	var req kernelReq
	var resp kernelResp
	if err := json.Unmarshal(line, &req); err != nil {
		resp = kernelResp{Code: 1, Msg: "bad kernel request"}
	} else if failed := s.kernelFault(vmName, req.Op, c); failed != "" {
		resp = kernelResp{Code: 1, Msg: failed}
	} else {
		resp = s.kernelCall(vmName, req)
	}
	reply(c, resp)
}

// kernelFault applies a kernel fault for op in vmName: a hang ends when released (then
// the op runs), when the qube dies or the tool is killed (then it fails). It returns a
// failure message, or "" to run the op.
func (s *Sim) kernelFault(vmName, op string, c net.Conn) string {
	w := s.World
	w.mu.Lock()
	f, ok := w.takeKernelFault(vmName, op)
	release := w.release
	var halted chan struct{}
	if vm := w.vms[vmName]; vm != nil {
		halted = vm.halted
	}
	w.mu.Unlock()
	if !ok {
		return ""
	}
	w.fired(op + " " + vmName)
	if f.Fail {
		return "injected failure of " + op
	}
	select {
	case <-release:
		return ""
	case <-halted:
		return "qube is not running"
	case <-closedByPeer(c):
		return "killed"
	}
}

func (s *Sim) kernelCall(vmName string, req kernelReq) kernelResp {
	w := s.World
	w.mu.Lock()
	defer w.mu.Unlock()
	vm := w.vms[vmName]
	if !vm.running() {
		return kernelResp{Code: 1, Msg: "qube is not running"}
	}
	k := vm.kernel
	var resp kernelResp
	err := func() error {
		switch req.Op {
		case "loop-setup":
			b, err := k.loopSetup(req.File, req.RO)
			if err == nil {
				resp.Dev = "/dev/" + b.name
			}
			return err
		case "loop-detach":
			return k.loopDetach(req.Dev)
		case "loop-list":
			for _, b := range k.sortedDevs() {
				if b.kind == kindLoop && (req.File == "" || b.backing == filepath.Clean(req.File)) {
					resp.Loops = append(resp.Loops, loopInfo{Dev: "/dev/" + b.name, Backing: b.backing, RO: b.ro})
				}
			}
			return nil
		case "luks-format":
			return k.luksFormat(req)
		case "crypt-open":
			_, err := k.cryptOpen(req.Dev, req.Name, req.Key, req.Plain, req.RO, req.Cipher, req.KeyBits)
			return err
		case "crypt-close":
			return k.cryptClose(req.Name)
		case "crypt-status":
			b := k.dmByName(req.Name)
			if b == nil {
				return fail(4, "/dev/mapper/%s is inactive.", req.Name)
			}
			resp.Crypt = &cryptInfo{Sectors: b.io.Size() / 512, Type: b.cryptType, Cipher: b.cipher, KeyBits: b.keyBits, Device: "/dev/" + b.under.name, RO: b.ro, InUse: k.busy(b) != ""}
			return nil
		case "is-luks", "luks-uuid":
			b, err := k.resolve(req.Dev)
			if err != nil {
				return err
			}
			h, err := readLUKS(b.io)
			if err != nil {
				return fail(1, "Device %s is not a valid LUKS device.", req.Dev)
			}
			resp.UUID = h.UUID
			return nil
		case "mkfs":
			return k.mkfs(req)
		case "mount":
			warn, err := k.mount(req.Dev, req.Target, req.RO, req.Flags)
			resp.Warning = warn
			return err
		case "umount":
			return k.umount(req.Target, true)
		case "mounts":
			for _, m := range k.mounts {
				src := "/dev/" + m.dev.name
				if m.dev.kind == kindDM {
					src = "/dev/mapper/" + m.dev.mapper
				}
				opts := "rw"
				if m.ro {
					opts = "ro"
				}
				if m.flags != "" {
					opts += "," + m.flags
				}
				resp.Mounts = append(resp.Mounts, mountInfo{Source: src, Target: m.target, FSType: m.meta.Type, Options: opts})
			}
			sort.Slice(resp.Mounts, func(i, j int) bool { return resp.Mounts[i].Target < resp.Mounts[j].Target })
			return nil
		case "devices":
			resp.Devices = k.devNodes()
			return nil
		case "blockdev":
			b, err := k.resolve(req.Dev)
			if err != nil {
				return fail(1, "blockdev: cannot open %s: No such file or directory", req.Dev)
			}
			resp.Size, resp.RO = b.io.Size(), b.ro || attRO(b)
			return nil
		case "fs-set":
			for _, m := range k.mounts {
				if m.target == filepath.Clean(req.Target) {
					if m.meta.Type != "btrfs" {
						return fail(1, "ERROR: not a btrfs filesystem: %s", req.Target)
					}
					m.meta.Compression = req.Compression
					return nil
				}
			}
			return fail(1, "ERROR: not a btrfs filesystem: %s", req.Target)
		}
		return fail(1, "not supported by the simulator: kernel operation %q", req.Op)
	}()
	if req.Op != "devices" {
		resp.Devices = k.devNodes()
	}
	var te *toolError
	switch {
	case err == nil:
	case errors.As(err, &te):
		resp.Code, resp.Msg = te.code, te.msg
	default:
		resp.Code, resp.Msg = 1, err.Error()
	}
	return resp
}

func (k *kernel) luksFormat(req kernelReq) error {
	b, err := k.resolve(req.Dev)
	if err != nil {
		return err
	}
	if who := k.busy(b); who != "" {
		return fail(5, "Cannot format device %s in use.", req.Dev)
	}
	if b.ro || attRO(b) {
		return fail(1, "Cannot format device %s: read-only.", req.Dev)
	}
	h := luksHeader{Version: 2, Cipher: "aes-xts-plain64", KeyBits: 512, Hash: "sha256", PBKDF: "argon2id", Label: req.Label}
	switch req.Type {
	case "", "luks", "luks2":
	case "luks1":
		h.Version, h.PBKDF = 1, "pbkdf2"
	default:
		return fail(1, "not supported by the simulator: luksFormat --type %s", req.Type)
	}
	if req.Cipher != "" {
		h.Cipher = req.Cipher
	}
	if req.KeyBits != 0 {
		h.KeyBits = req.KeyBits
	}
	if req.Hash != "" {
		h.Hash = req.Hash
	}
	if req.PBKDF != "" {
		h.PBKDF = req.PBKDF
	}
	if len(req.Key) == 0 {
		return fail(1, "Nothing to read on input.")
	}
	if err := formatLUKS(b.io, h, req.Key); err != nil {
		return fail(1, "Cannot format device %s: %v.", req.Dev, err)
	}
	return nil
}

func (k *kernel) mkfs(req kernelReq) error {
	b, err := k.resolve(req.Dev)
	if err != nil {
		return fail(1, "mkfs: %s: No such file or directory", req.Dev)
	}
	if who := k.busy(b); who != "" {
		return fail(1, "mkfs: %s is apparently in use by the system (%s); will not make a filesystem here!", req.Dev, who)
	}
	if b.ro || attRO(b) {
		return fail(1, "mkfs: %s: Read-only file system", req.Dev)
	}
	if req.Type != "ext4" && req.Type != "btrfs" {
		return fail(1, "not supported by the simulator: mkfs type %q (ext4 and btrfs are)", req.Type)
	}
	meta := fsMeta{Type: req.Type, UUID: newUUID(), Label: req.Label}
	if err := writeFS(b.io, meta, ""); err != nil {
		return fail(1, "mkfs: %v", err)
	}
	return nil
}

// kernelCall is the fake tools' side: one request per connection.
func kernelCall(req kernelReq) (kernelResp, error) {
	path := os.Getenv("QUBES_SIM_KERNEL")
	if path == "" {
		return kernelResp{}, errors.New("not inside a qubes-sim qube (QUBES_SIM_KERNEL is not set)")
	}
	var resp kernelResp
	err := jsonCall(path, "simulated kernel", req, &resp)
	return resp, err
}

// absPath makes a tool argument absolute against the working directory.
func absPath(p string) string {
	if filepath.IsAbs(p) || strings.HasPrefix(p, "/") {
		return filepath.Clean(p)
	}
	wd, _ := os.Getwd()
	return filepath.Join(wd, p)
}
