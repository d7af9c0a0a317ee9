// Package kernelcall is the protocol between the fake block tools inside a simulated
// qube (sandbox backend) and that qube's in-memory kernel in the simulator: one JSON
// request line, one JSON answer line, one connection per call, on the socket named by
// SocketEnv. The qube is known from the socket a request came in on, never from the
// request.
package kernelcall

import (
	"errors"
	"os"

	"github.com/qcrypt/qcrypt/qubessim/internal/jsonline"
)

// SocketEnv names the environment variable that holds the kernel socket's path inside
// a qube's sandbox.
const SocketEnv = "QUBES_SIM_KERNEL"

// Op is a kernel operation.
type Op string

// The kernel operations, and the request fields each reads.
const (
	LoopSetup   Op = "loop-setup"   // File, RO → Dev
	LoopDetach  Op = "loop-detach"  // Dev
	LoopList    Op = "loop-list"    // File ("" for all) → Loops
	LuksFormat  Op = "luks-format"  // Dev, Key, Type, Cipher, KeyBits, Hash, PBKDF, Label
	CryptOpen   Op = "crypt-open"   // Dev, Name, Key, Plain, RO, Cipher, KeyBits
	CryptClose  Op = "crypt-close"  // Name
	CryptStatus Op = "crypt-status" // Name → Crypt
	IsLuks      Op = "is-luks"      // Dev → UUID
	Mkfs        Op = "mkfs"         // Dev, Type, Label
	Mount       Op = "mount"        // Dev, Target, RO, Flags → Warning
	Umount      Op = "umount"       // Target
	Mounts      Op = "mounts"       // → Mounts
	Devices     Op = "devices"      // → Devices
	Blockdev    Op = "blockdev"     // Dev → Size, RO
	FSSet       Op = "fs-set"       // Target, Compression
)

// Request is what a fake tool asks of its qube's kernel.
type Request struct {
	Op          Op     `json:"op"`
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

// Response is the kernel's answer. Code is the exit status the tool reports (with Msg
// on its stderr); every answer carries the qube's block devices, so the tool can bring
// the sandbox's /dev up to date.
type Response struct {
	Code    int       `json:"code"`
	Msg     string    `json:"msg,omitempty"`
	Dev     string    `json:"dev,omitempty"`
	Warning string    `json:"warning,omitempty"`
	Loops   []Loop    `json:"loops,omitempty"`
	Mounts  []Mounted `json:"mounts,omitempty"`
	Crypt   *Crypt    `json:"crypt,omitempty"`
	Size    int64     `json:"size,omitempty"`
	RO      bool      `json:"ro,omitempty"`
	UUID    string    `json:"uuid,omitempty"`
	Devices []DevNode `json:"devices,omitempty"`
}

// Loop is a loop device.
type Loop struct {
	Dev     string `json:"dev"`
	Backing string `json:"backing"`
	RO      bool   `json:"ro"`
}

// Mounted is a mounted file system.
type Mounted struct {
	Source  string `json:"source"`
	Target  string `json:"target"`
	FSType  string `json:"fstype"`
	Options string `json:"options"`
}

// Crypt is an open dm-crypt mapping.
type Crypt struct {
	Sectors int64  `json:"sectors"`
	Type    string `json:"type"`
	Cipher  string `json:"cipher"`
	KeyBits int    `json:"key_bits"`
	Device  string `json:"device"`
	RO      bool   `json:"ro"`
	InUse   bool   `json:"in_use"`
}

// DevNode is a block device as /dev shows it: its node, and the links to it.
type DevNode struct {
	Name   string `json:"name"`
	Mapper string `json:"mapper,omitempty"`
	UUID   string `json:"uuid,omitempty"`
	Label  string `json:"label,omitempty"`
}

// Call makes one call to the kernel of the qube this process runs in.
func Call(req Request) (Response, error) {
	path := os.Getenv(SocketEnv)
	if path == "" {
		return Response{}, errors.New("not inside a qubes-sim qube (" + SocketEnv + " is not set)")
	}
	var resp Response
	err := jsonline.Call(path, "simulated kernel", req, &resp)
	return resp, err
}
