package memkernel

import (
	"errors"
	"path/filepath"
	"sort"

	"github.com/qcrypt/qcrypt/qubessim/kernelcall"
)

// Call serves one call of the fake tools (kernelcall): every answer carries the
// qube's devices, so the tool can bring its /dev up to date.
func (k *Kernel) Call(req kernelcall.Request) kernelcall.Response {
	var resp kernelcall.Response
	var err error
	if op, ok := kernelOps[req.Op]; ok {
		err = op(k, req, &resp)
	} else {
		err = fail(1, "not supported by the simulator: kernel operation %q", req.Op)
	}
	if req.Op != kernelcall.Devices {
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

func (k *Kernel) luksFormat(req kernelcall.Request) error {
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

func (k *Kernel) mkfs(req kernelcall.Request) error {
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

// kernelOps is the kernel's side of every operation of kernelcall (World.mu held).
var kernelOps = map[kernelcall.Op]func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error{
	kernelcall.LoopSetup: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
		b, err := k.loopSetup(req.File, req.RO)
		if err == nil {
			resp.Dev = "/dev/" + b.name
		}
		return err
	},
	kernelcall.LoopDetach: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
		return k.loopDetach(req.Dev)
	},
	kernelcall.LoopList: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
		for _, b := range k.sortedDevs() {
			if b.kind == kindLoop && (req.File == "" || b.backing == filepath.Clean(req.File)) {
				resp.Loops = append(resp.Loops, kernelcall.Loop{Dev: "/dev/" + b.name, Backing: b.backing, RO: b.ro})
			}
		}
		return nil
	},
	kernelcall.LuksFormat: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
		return k.luksFormat(req)
	},
	kernelcall.CryptOpen: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
		_, err := k.cryptOpen(req.Dev, req.Name, req.Key, req.Plain, req.RO, req.Cipher, req.KeyBits)
		return err
	},
	kernelcall.CryptClose: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
		return k.cryptClose(req.Name)
	},
	kernelcall.CryptStatus: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
		b := k.dmByName(req.Name)
		if b == nil {
			return fail(4, "/dev/mapper/%s is inactive.", req.Name)
		}
		resp.Crypt = &kernelcall.Crypt{Sectors: b.io.Size() / 512, Type: b.cryptType, Cipher: b.cipher, KeyBits: b.keyBits, Device: "/dev/" + b.under.name, RO: b.ro, InUse: k.busy(b) != ""}
		return nil
	},
	kernelcall.IsLuks: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
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
	},
	kernelcall.Mkfs: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
		return k.mkfs(req)
	},
	kernelcall.Mount: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
		warn, err := k.mount(req.Dev, req.Target, req.RO, req.Flags)
		resp.Warning = warn
		return err
	},
	kernelcall.Umount: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
		return k.umount(req.Target, true)
	},
	kernelcall.Mounts: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
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
			resp.Mounts = append(resp.Mounts, kernelcall.Mounted{Source: src, Target: m.target, FSType: m.meta.Type, Options: opts})
		}
		sort.Slice(resp.Mounts, func(i, j int) bool { return resp.Mounts[i].Target < resp.Mounts[j].Target })
		return nil
	},
	kernelcall.Devices: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
		resp.Devices = k.devNodes()
		return nil
	},
	kernelcall.Blockdev: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
		b, err := k.resolve(req.Dev)
		if err != nil {
			return fail(1, "blockdev: cannot open %s: No such file or directory", req.Dev)
		}
		resp.Size, resp.RO = b.io.Size(), b.ro || attRO(b)
		return nil
	},
	kernelcall.FSSet: func(k *Kernel, req kernelcall.Request, resp *kernelcall.Response) error {
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
	},
}

// devNodes lists what /dev must show for a qube (World.mu held).
func (k *Kernel) devNodes() []kernelcall.DevNode {
	var out []kernelcall.DevNode
	for _, b := range k.sortedDevs() {
		n := kernelcall.DevNode{Name: b.name, Mapper: b.mapper}
		if meta, _, err := readFSMeta(b.io); err == nil {
			n.UUID, n.Label = meta.UUID, meta.Label
		} else if h, err := readLUKS(b.io); err == nil {
			n.UUID, n.Label = h.UUID, h.Label
		}
		out = append(out, n)
	}
	return out
}
