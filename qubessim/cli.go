package qubessim

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/control"
	"github.com/qcrypt/qcrypt/qubessim/inqube"
	"github.com/qcrypt/qcrypt/qubessim/memkernel"
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
	if os.Getenv(inqube.MapperPrefixEnv) != "" {
		switch filepath.Base(args[0]) {
		case "cryptsetup":
			return inqube.CryptsetupWrapper(args[1:], os.Stdin, stdout, stderr)
		case "dmsetup":
			return inqube.DmsetupWrapper(args[1:], stdout, stderr)
		}
	}
	if tool := inqube.ToolName(args[0]); tool != "" {
		return inqube.RunTool(tool, args[1:], os.Stdin, stdout, stderr)
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
		return inqube.SandboxInit(args[2:])
	case "qube-holder":
		return inqube.QubeHolder(args[2:])
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
	var err error
	if req, ok, perr := control.Parse(a); ok {
		if perr != nil {
			fmt.Fprintf(stderr, "qubes-sim ctl %s: %v\n%s", a[0], perr, usage)
			return 2
		}
		var resp control.Response
		resp, err = control.Call(*socket, req)
		for _, out := range []string{resp.Port, resp.Fired} {
			if out != "" {
				fmt.Fprintln(stdout, out)
			}
		}
	} else {
		var code int
		if code, err = adminCtl(*socket, a, stdout, stderr); code != 0 {
			return code
		}
	}
	if err != nil {
		fmt.Fprintln(stderr, "qubes-sim:", err)
		return 1
	}
	return 0
}

// adminCtl runs the ctl commands that are not control operations: those the Admin API
// serves and make-disk, which needs no simulator. It returns a usage error's status, or
// 0 and the command's error.
func adminCtl(socket string, a []string, stdout, stderr io.Writer) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := qubes.NewClient(socket)
	vmOps := map[string]func(context.Context, string) error{
		"start":    c.Start,
		"shutdown": func(ctx context.Context, vm string) error { return c.Shutdown(ctx, vm, false, true) },
		"kill":     c.Kill,
		"pause":    c.Pause,
		"unpause":  c.Unpause,
	}
	switch op := vmOps[a[0]]; {
	case a[0] == "list":
		vms, err := c.ListVMs(ctx)
		for _, vm := range vms {
			fmt.Fprintf(stdout, "%-12s %-10s %s\n", vm.Name, vm.Class, vm.State)
		}
		return 0, err
	case op != nil && len(a) == 2:
		return 0, op(ctx, a[1])
	case a[0] == "make-disk" && len(a) >= 4:
		size, err := strconv.ParseInt(a[2], 10, 64)
		if err != nil {
			fmt.Fprintln(stderr, "qubes-sim ctl make-disk: SIZE must be a number of bytes")
			return 2, nil
		}
		files := map[string][]byte{}
		for _, spec := range a[4:] {
			p, host, ok := strings.Cut(spec, "=")
			if !ok {
				fmt.Fprintln(stderr, "qubes-sim ctl make-disk: files are PATH=HOSTFILE")
				return 2, nil
			}
			data, err := os.ReadFile(host)
			if err != nil {
				return 0, err
			}
			files[p] = data
		}
		return 0, memkernel.MakeDiskImage(a[1], size, a[3], files)
	}
	fmt.Fprint(stderr, usage)
	return 2, nil
}
