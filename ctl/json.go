package ctl

import (
	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
)

// chainJSON is the JSON form of a chain (list, status).
type chainJSON struct {
	Name       string   `json:"name"`
	State      string   `json:"state"`
	Waiting    string   `json:"waiting,omitempty"`
	Step       uint32   `json:"step,omitempty"`
	Steps      uint32   `json:"steps,omitempty"`
	LastError  string   `json:"last_error,omitempty"`
	Target     string   `json:"target"`
	Layers     []string `json:"layers"`
	MountPoint string   `json:"mount_point,omitempty"`
	Managed    bool     `json:"managed"`
	ReadOnly   bool     `json:"read_only"`
	Autostart  bool     `json:"autostart"`
	RetryAt    string   `json:"retry_at,omitempty"` // RFC 3339: the next automatic attempt
}

func toJSON(c dbusapi.ChainInfo) chainJSON {
	return chainJSON{Name: c.Name, State: string(c.State), Waiting: c.Waiting, Step: c.Step, Steps: c.Steps, LastError: c.LastError,
		Target: c.Target, Layers: c.Layers, MountPoint: c.MountPoint, Managed: c.Managed, ReadOnly: c.ReadOnly, Autostart: c.Autostart,
		RetryAt: retryAt(c)}
}

type discoveredJSON struct {
	Line     string   `json:"line"`
	SourceVM string   `json:"source_vm"`
	File     string   `json:"file,omitempty"`
	Key      string   `json:"key,omitempty"`
	Qubes    []string `json:"qubes"`
	ReadOnly bool     `json:"read_only"`
	Managed  string   `json:"managed_by,omitempty"`
	Command  string   `json:"status_command"`
}

func discoveredToJSON(d dbusapi.Discovered) discoveredJSON {
	var vms []string
	for _, h := range d.Hops {
		vms = append(vms, h.VM)
	}
	key, file := d.Key, d.File
	if key == "" {
		key = "UNKNOWN-KEY"
	}
	if file == "" {
		file = "UNKNOWN-FILE"
	}
	return discoveredJSON{Line: d.String(), SourceVM: d.SourceVM, File: d.File, Key: d.Key, Qubes: vms, ReadOnly: d.ReadOnly,
		Managed: d.ManagedBy, Command: "qcryptctl status -- " + shellWords(append([]string{d.SourceVM, file, key}, vms...))}
}

// statusJSON is status without a chain: every configured chain and what is open
// that qcryptd does not manage.
type statusJSON struct {
	Chains    []chainJSON      `json:"chains"`
	Unmanaged []discoveredJSON `json:"unmanaged"`
}

// jobJSON is how a job ended (open, close, luks-init, keystore unlock|lock|init).
type jobJSON struct {
	Success bool   `json:"success"`
	Message string `json:"message"`
}

// planStepJSON is one step of plan.
type planStepJSON struct {
	VM   string `json:"vm"`
	Step string `json:"step"`
}

type checkJSON struct {
	OK     bool     `json:"ok"`
	Errors []string `json:"errors"`
}

type reloadJSON struct {
	Chains int `json:"chains"`
}

// canceledJSON is one job cancel canceled.
type canceledJSON struct {
	Job       uint64               `json:"job"`
	Operation dbusapi.JobOperation `json:"operation"`
	Chain     string               `json:"chain"`
}

// closedJSON is one chain close-all closed.
type closedJSON struct {
	Job     string `json:"job"`
	Chain   string `json:"chain"`
	Success bool   `json:"success"`
	Message string `json:"message"`
}

// watchJSON is one line of watch.
type watchJSON struct {
	Time     string `json:"time"`
	Chain    string `json:"chain"`
	State    string `json:"state"`
	Previous string `json:"previous"`
	Cause    string `json:"cause"`
	Detail   string `json:"detail"`
}

// errorJSON is what a command prints instead of its result when it fails first.
type errorJSON struct {
	Error string `json:"error"`
	Exit  int    `json:"exit"`
}

// jsonOutputs are the --json outputs and where docs/qcryptctl.md describes each: the
// first {...} after the anchor lists its fields, which a test holds against the type.
var jsonOutputs = []struct {
	anchor string
	v      any
}{
	{"`list`", chainJSON{}},
	{"`status`:", statusJSON{}},
	{"`status CHAIN`", chains.Status{}},
	{"`open`", jobJSON{}},
	{"`keystore status`", chains.KeystoreState{}},
	{"`plan`", planStepJSON{}},
	{"`check`", checkJSON{}},
	{"`reload`", reloadJSON{}},
	{"`cancel`", canceledJSON{}},
	{"`close-all`", closedJSON{}},
	{"`watch`", watchJSON{}},
	{"prints `{error", errorJSON{}},
}
