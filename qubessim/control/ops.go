package control

import (
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/qcrypt/qcrypt/qubessim/kernelcall"
)

// spec is one operation: how its command line (qubes-sim ctl OP ARGS) is parsed (no
// parse: not a command-line operation) and what the server must know of it.
type spec struct {
	args      int // at least this many arguments
	parse     func(a []string) (Request, error)
	stdio     bool // passes stdin, stdout and stderr (exec)
	ownServer bool // needs the simulator's own Admin API server
	devices   bool // changes a qube's block devices
}

var ops = map[Op]spec{
	Ping:        {parse: bare(Ping)},
	QrexecReady: {},
	Exec:        {stdio: true},
	AddVM: {args: 1, parse: func(a []string) (Request, error) {
		r := Request{Op: AddVM, VM: a[0], Class: "AppVM", User: "user"}
		if len(a) > 1 {
			r.Class = a[1]
		}
		if len(a) > 2 {
			r.User = a[2]
		}
		return r, nil
	}},
	Plug: {args: 2, devices: true, parse: func(a []string) (Request, error) {
		img, err := filepath.Abs(a[1])
		r := Request{Op: Plug, VM: a[0], Image: img}
		if len(a) > 2 {
			r.Desc = a[2]
		}
		return r, err
	}},
	Unplug: {args: 2, devices: true, parse: func(a []string) (Request, error) {
		return Request{Op: Unplug, VM: a[0], Port: a[1]}, nil
	}},
	Describe: {args: 3, devices: true, parse: func(a []string) (Request, error) {
		return Request{Op: Describe, VM: a[0], Port: a[1], Desc: a[2]}, nil
	}},
	SetFault: {args: 2, ownServer: true, parse: parseFault},
	SetQrexec: {args: 2, parse: func(a []string) (Request, error) {
		var q QrexecFault
		switch {
		case a[1] == "hang":
			q.Hang = true
		case a[1] == "exit" && len(a) > 2:
			code, err := strconv.Atoi(a[2])
			if err != nil {
				return Request{}, fmt.Errorf("exit CODE: not a number: %q", a[2])
			}
			q.Exit = code
		case a[1] == "start-fail" && len(a) > 2:
			q.StartFail = a[2]
		case a[1] == "none":
		default:
			return Request{}, fmt.Errorf("hang, exit CODE, start-fail REASON or none")
		}
		return Request{Op: SetQrexec, VM: a[0], Qrexec: &q}, nil
	}},
	SetKernel: {args: 3,
		parse: func(a []string) (Request, error) {
			k := KernelFault{VM: a[0], Op: kernelcall.Op(a[1]), Hang: a[2] == "hang", Fail: a[2] == "fail"}
			if !k.Hang && !k.Fail {
				return Request{}, fmt.Errorf("hang or fail")
			}
			return Request{Op: SetKernel, Kernel: &k}, nil
		}},
	WaitFault: {parse: func(a []string) (Request, error) {
		r := Request{Op: WaitFault, Count: 120}
		if len(a) > 0 {
			n, err := strconv.Atoi(a[0])
			if err != nil {
				return r, fmt.Errorf("SECS: not a number: %q", a[0])
			}
			r.Count = n
		}
		return r, nil
	}},
	Release:     {parse: bare(Release)},
	ClearFaults: {parse: bare(ClearFaults)},
	Calls:       {parse: bare(Calls)},
	Latency: {args: 2,
		parse: func(a []string) (Request, error) {
			admin, aerr := time.ParseDuration(a[0])
			qrexec, qerr := time.ParseDuration(a[1])
			if aerr != nil || qerr != nil || admin < 0 || qrexec < 0 {
				return Request{}, fmt.Errorf("not two durations: %q %q", a[0], a[1])
			}
			return Request{Op: Latency, AdminLatency: admin, QrexecLatency: qrexec}, nil
		}},
	DropEvents: {ownServer: true, parse: bare(DropEvents)},
	Flood: {args: 2, ownServer: true, parse: func(a []string) (Request, error) {
		n, err := strconv.Atoi(a[1])
		if err != nil {
			return Request{}, fmt.Errorf("the count N is not a number: %q", a[1])
		}
		return Request{Op: Flood, VM: a[0], Count: n}, nil
	}},
	RestartQubesd: {parse: bare(RestartQubesd)},
}

func bare(op Op) func([]string) (Request, error) {
	return func([]string) (Request, error) { return Request{Op: op}, nil }
}

func parseFault(a []string) (Request, error) {
	f := Fault{Method: a[0]}
	rest := a[2:]
	switch a[1] {
	case "empty":
		f.Empty = true
	case "exception":
		if len(rest) < 2 {
			return Request{}, fmt.Errorf("exception needs TYPE MESSAGE")
		}
		f.Type, f.Msg, rest = rest[0], rest[1], rest[2:]
	case "hold":
		f.Held = true
	case "delay":
		if len(rest) < 1 {
			return Request{}, fmt.Errorf("delay needs MS")
		}
		ms, err := strconv.Atoi(rest[0])
		if err != nil {
			return Request{}, fmt.Errorf("delay MS: not a number: %q", rest[0])
		}
		f.Delay, rest = time.Duration(ms)*time.Millisecond, rest[1:]
	default:
		return Request{}, fmt.Errorf("kind is empty, exception, delay or hold")
	}
	if len(rest) > 0 {
		f.Dest = rest[0]
	}
	return Request{Op: SetFault, Fault: &f}, nil
}

// Parse makes a request of a command line (qubes-sim ctl OP ARGS). ok is false when
// OP is not a control operation; err names what is wrong with the arguments.
func Parse(args []string) (req Request, ok bool, err error) {
	name := args[0]
	op := Op(strings.TrimSuffix(name, "-ro")) // plug-ro is plug, read-only
	spec, known := ops[op]
	if !known || spec.parse == nil || (op != Plug && name != string(op)) {
		return Request{}, false, nil
	}
	if len(args)-1 < spec.args {
		return Request{}, true, fmt.Errorf("missing arguments")
	}
	req, err = spec.parse(args[1:])
	req.RO = req.RO || name == "plug-ro"
	return req, true, err
}
