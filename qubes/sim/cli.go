package sim

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
)

const usage = `usage:
  qubes-sim serve --socket PATH [--state DIR] [--qubes-version 4.2|4.3] [--demo] [--backend sandbox|kernel]
                  [--real-qubesd DIR] [--real-qrexec DIR]
  qubes-sim qrexec-client --socket PATH [--ready] -d VM [-w SECS] USER:CMDLINE
  qubes-sim qrexec-ready --socket PATH -d VM [...]   (before the real qrexec-client; --real-qrexec)
  qubes-sim build-real-qrexec SRC CACHE 4.2|4.3     (builds ../shared/real-qrexec once; prints the build)
  qubes-sim demo-chain                              (prints the chain file that opens the demo container)
  qubes-sim ctl --socket PATH COMMAND [ARGS]

ctl commands:
  ping (answers once the world is ready) | list | start VM | shutdown VM | kill VM | pause VM | unpause VM
  add-vm NAME [CLASS [USER]]
  plug VM IMAGE [DESCRIPTION] | plug-ro VM IMAGE [DESCRIPTION] | unplug VM PORT
  make-disk IMAGE SIZE LABEL [PATH=HOSTFILE ...]
  fault METHOD empty|exception TYPE MESSAGE|delay MS|hold [DEST]
  qrexec-fault VM hang|exit CODE|start-fail REASON|none
  kernel-fault VM OP hang|fail     (once; OP: loop-setup loop-detach crypt-open crypt-close mount umount)
  wait-fault [SECS]                (waits until a fault fires and prints it) | release (held calls go on)
  calls                            (Admin API and qrexec calls served so far: admin=N qrexec=M)
  latency ADMIN QREXEC             (wait this long in every Admin API and qrexec call from now on,
                                    e.g. 3ms 100ms as on a real machine; 0 0 ends it)
  clear-faults | drop-events | flood VM N | describe VM PORT DESCRIPTION
  restart-qubesd                   (the own server drops its event streams and held calls)
  (with --real-qubesd: fault, drop-events and flood need the own server)
`

// Main is the qubes-sim command (and, invoked under a tool's name, that fake tool).
func Main(args []string, stdout, stderr io.Writer) int {
	if os.Getenv(dmPrefixEnv) != "" {
		switch filepath.Base(args[0]) {
		case "cryptsetup":
			return CryptsetupWrapper(args[1:], os.Stdin, stdout, stderr)
		case "dmsetup":
			return DmsetupWrapper(args[1:], stdout, stderr)
		}
	}
	if tool := ToolName(args[0]); tool != "" {
		return RunTool(tool, args[1:], os.Stdin, stdout, stderr)
	}
	if filepath.Base(args[0]) == "qrexec-client" {
		return QrexecClient(args[1:])
	}
	if len(args) < 2 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[1] {
	case "serve":
		return serve(args[2:], stderr)
	case "qrexec-client":
		return QrexecClient(args[2:])
	case "qrexec-ready":
		return QrexecReady(args[2:], stderr)
	case "build-real-qrexec":
		if len(args) != 5 {
			fmt.Fprintln(stderr, "usage: qubes-sim build-real-qrexec SRC CACHE 4.2|4.3")
			return 2
		}
		out, err := BuildRealQrexec(args[2], args[3], args[4])
		if err != nil {
			fmt.Fprintln(stderr, "qubes-sim:", err)
			return 1
		}
		fmt.Fprintln(stdout, out)
		return 0
	case "demo-chain":
		fmt.Fprint(stdout, "# The demo chain: container in sys-usb, outer layer opened by mediator, inner by work.\n"+
			DemoChain("read-only=false"))
		return 0
	case "sandbox-init":
		return SandboxInit(args[2:])
	case "qube-holder":
		return QubeHolder(args[2:])
	case "ctl":
		return ctl(args[2:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprint(stderr, usage)
	return 2
}

func serve(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", "", "Admin API socket to serve (required)")
	state := fs.String("state", "", "state directory (default: a new temporary directory)")
	version := fs.String("qubes-version", "4.2", "Qubes release to simulate: 4.2 or 4.3")
	demo := fs.Bool("demo", false, "start with the demo world")
	backend := fs.String("backend", BackendSandbox, "how qubes run: sandbox (fake block tools) or kernel (real kernel; root)")
	realQubesd := fs.String("real-qubesd", "", "folder with the real qubesd's start.sh: it serves the Admin API, the simulator runs the qubes")
	realQrexec := fs.String("real-qrexec", "", "a build of the real qrexec (real-qrexec/build.sh OUT): qubes run its agent; callers use STATE/qrexec/qrexec-client")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *socket == "" {
		fmt.Fprintln(stderr, "qubes-sim serve: --socket is required")
		return 2
	}
	if *state == "" {
		dir, err := os.MkdirTemp("", "qubes-sim-")
		if err != nil {
			fmt.Fprintln(stderr, "qubes-sim:", err)
			return 1
		}
		defer os.RemoveAll(dir)
		*state = dir
	}
	s, err := Start(Config{Dir: *state, Dialect: Dialect(*version), Socket: *socket, Demo: *demo, Backend: *backend, RealQubesd: *realQubesd, RealQrexec: *realQrexec,
		Log: stderr})
	if err != nil {
		fmt.Fprintln(stderr, "qubes-sim:", err)
		return 1
	}
	defer s.Close()
	if *realQubesd != "" {
		fmt.Fprintf(stderr, "qubes-sim: the real qubesd %s serving %s, qubes simulated (state %s)\n", *version, *socket, *state)
	} else {
		fmt.Fprintf(stderr, "qubes-sim: Qubes %s simulator serving %s (state %s)\n", *version, *socket, *state)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	return 0
}

func ctl(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("ctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	socket := fs.String("socket", qubes.DefaultSocket, "Admin API socket of the simulator")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	a := fs.Args()
	if len(a) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	need := func(n int) bool {
		if len(a) < n+1 {
			fmt.Fprintf(stderr, "qubes-sim ctl %s: missing arguments\n%s", a[0], usage)
			return false
		}
		return true
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := qubes.NewClient(*socket)
	var err error
	var req *ctlRequest
	switch a[0] {
	case "list":
		var vms []qubes.VM
		if vms, err = c.ListVMs(ctx); err == nil {
			for _, vm := range vms {
				fmt.Fprintf(stdout, "%-12s %-10s %s\n", vm.Name, vm.Class, vm.State)
			}
		}
	case "start", "shutdown", "kill", "pause", "unpause":
		if !need(1) {
			return 2
		}
		switch a[0] {
		case "start":
			err = c.Start(ctx, a[1])
		case "shutdown":
			err = c.Shutdown(ctx, a[1], false, true)
		case "kill":
			err = c.Kill(ctx, a[1])
		case "pause":
			err = c.Pause(ctx, a[1])
		case "unpause":
			err = c.Unpause(ctx, a[1])
		}
	case "add-vm":
		if !need(1) {
			return 2
		}
		req = &ctlRequest{Op: "add-vm", VM: a[1], Class: "AppVM", User: "user"}
		if len(a) > 2 {
			req.Class = a[2]
		}
		if len(a) > 3 {
			req.User = a[3]
		}
	case "plug", "plug-ro":
		if !need(2) {
			return 2
		}
		img, _ := filepath.Abs(a[2])
		req = &ctlRequest{Op: "plug", VM: a[1], Image: img, RO: a[0] == "plug-ro"}
		if len(a) > 3 {
			req.Desc = a[3]
		}
	case "unplug":
		if !need(2) {
			return 2
		}
		req = &ctlRequest{Op: "unplug", VM: a[1], Port: a[2]}
	case "make-disk":
		if !need(3) {
			return 2
		}
		size, perr := strconv.ParseInt(a[2], 10, 64)
		if perr != nil {
			fmt.Fprintln(stderr, "qubes-sim ctl make-disk: SIZE must be a number of bytes")
			return 2
		}
		files := map[string][]byte{}
		for _, spec := range a[4:] {
			p, host, ok := cutEq(spec)
			if !ok {
				fmt.Fprintln(stderr, "qubes-sim ctl make-disk: files are PATH=HOSTFILE")
				return 2
			}
			data, rerr := os.ReadFile(host)
			if rerr != nil {
				fmt.Fprintln(stderr, "qubes-sim:", rerr)
				return 1
			}
			files[p] = data
		}
		err = MakeDiskImage(a[1], size, a[3], files)
	case "fault":
		if !need(2) {
			return 2
		}
		f := Fault{Method: a[1]}
		rest := a[3:]
		switch a[2] {
		case "empty":
			f.Empty = true
		case "exception":
			if len(rest) < 2 {
				fmt.Fprintln(stderr, "qubes-sim ctl fault: exception needs TYPE MESSAGE")
				return 2
			}
			f.Type, f.Msg, rest = rest[0], rest[1], rest[2:]
		case "hold":
			f.Held = true
		case "delay":
			if len(rest) < 1 {
				fmt.Fprintln(stderr, "qubes-sim ctl fault: delay needs MS")
				return 2
			}
			ms, _ := strconv.Atoi(rest[0])
			f.Delay, rest = time.Duration(ms)*time.Millisecond, rest[1:]
		default:
			fmt.Fprintln(stderr, "qubes-sim ctl fault: kind is empty, exception, delay or hold")
			return 2
		}
		if len(rest) > 0 {
			f.Dest = rest[0]
		}
		req = &ctlRequest{Op: "fault", Fault: &f}
	case "qrexec-fault":
		if !need(2) {
			return 2
		}
		var q QrexecFault
		switch a[2] {
		case "hang":
			q.Hang = true
		case "exit":
			if !need(3) {
				return 2
			}
			q.Exit, _ = strconv.Atoi(a[3])
		case "start-fail":
			if !need(3) {
				return 2
			}
			q.StartFail = a[3]
		case "none":
		default:
			fmt.Fprintln(stderr, "qubes-sim ctl qrexec-fault: hang, exit CODE, start-fail REASON or none")
			return 2
		}
		req = &ctlRequest{Op: "qrexec-fault", VM: a[1], Qrexec: &q}
	case "kernel-fault":
		if !need(3) {
			return 2
		}
		k := KernelFault{VM: a[1], Op: a[2], Hang: a[3] == "hang", Fail: a[3] == "fail"}
		if !k.Hang && !k.Fail {
			fmt.Fprintln(stderr, "qubes-sim ctl kernel-fault: hang or fail")
			return 2
		}
		req = &ctlRequest{Op: "kernel-fault", Kernel: &k}
	case "wait-fault":
		req = &ctlRequest{Op: "wait-fault", Count: 120}
		if len(a) > 1 {
			req.Count, _ = strconv.Atoi(a[1])
		}
	case "clear-faults", "drop-events", "restart-qubesd", "ping", "release", "calls":
		req = &ctlRequest{Op: a[0]}
	case "flood":
		if !need(2) {
			return 2
		}
		n, _ := strconv.Atoi(a[2])
		req = &ctlRequest{Op: "flood", VM: a[1], Count: n}
	case "describe":
		if !need(3) {
			return 2
		}
		req = &ctlRequest{Op: "describe", VM: a[1], Port: a[2], Desc: a[3]}
	case "latency":
		if !need(2) {
			return 2
		}
		admin, aerr := time.ParseDuration(a[1])
		qrexec, qerr := time.ParseDuration(a[2])
		if aerr != nil || qerr != nil || admin < 0 || qrexec < 0 {
			fmt.Fprintf(stderr, "qubes-sim ctl latency: not two durations: %q %q\n", a[1], a[2])
			return 2
		}
		req = &ctlRequest{Op: "latency", AdminLatency: admin, QrexecLatency: qrexec}
	default:
		fmt.Fprint(stderr, usage)
		return 2
	}
	if req != nil {
		var resp ctlResponse
		resp, err = control(*socket, *req)
		if resp.Port != "" {
			fmt.Fprintln(stdout, resp.Port)
		}
		if resp.Fired != "" {
			fmt.Fprintln(stdout, resp.Fired)
		}
	}
	if err != nil {
		fmt.Fprintln(stderr, "qubes-sim:", err)
		return 1
	}
	return 0
}

func cutEq(s string) (string, string, bool) {
	for i := 0; i < len(s); i++ {
		if s[i] == '=' {
			return s[:i], s[i+1:], true
		}
	}
	return "", "", false
}
