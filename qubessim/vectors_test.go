package qubessim_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim"
	"github.com/qcrypt/qcrypt/qubessim/simtest"
)

// The real qubesd's answers and event sequences for every call and event qcrypt uses,
// recorded from ../shared/real-qubesd into testdata/real-qubesd/VERSION.txt
// (QCRYPT_RECORD_VECTORS=1, `make vectors`), and held against the simulator: both run the
// same script on the same starting world (the one real-qubesd starts with) and must
// produce the same transcript after normalisation of what differs from run to run.

// vstep is one step of the script: an Admin API call or what a qube's udev writes to
// QubesDB.
type vstep struct {
	method, arg, dest, payload string
	payload43                  string // R4.3's payload when it differs (device assignments)
	udev                       string // "block-add VM PORT SIZE MODE DESC" | "block-remove VM PORT"
}

const attach43 = "device_id='*' port_id='%s' devclass='block' backend_domain='%s' mode='manual' frontend_domain='%s' _read-only='%s'"

func attachStep(frontend, backend, port, ro string) vstep {
	return vstep{method: "admin.vm.device.block.Attach", arg: backend + "+" + port, dest: frontend,
		payload: "read-only=" + ro, payload43: fmt.Sprintf(attach43, port, backend, frontend, ro)}
}

func call(method, arg, dest string) vstep { return vstep{method: method, arg: arg, dest: dest} }

// vectorScript exercises every Admin API call qcrypt makes and every event it reads.
var vectorScript = []vstep{
	call("admin.vm.List", "", "dom0"),
	call("admin.vm.List", "", "work"),
	call("admin.vm.CurrentState", "", "work"),
	call("admin.vm.CurrentState", "", "nosuchvm"),
	call("admin.vm.property.Get", "default_user", "work"),
	call("admin.vm.property.Get", "qrexec_timeout", "work"),
	call("admin.vm.property.Get", "nope", "work"),
	call("admin.property.Get", "default_qrexec_timeout", "dom0"),
	call("admin.vm.device.block.Attached", "", "dom0"), // the device API probe
	call("admin.vm.device.block.Available", "", "sys-usb"),
	call("admin.vm.device.block.Available", "", "work"),
	call("admin.vm.Start", "", "sys-usb"), // running: a no-op
	call("admin.vm.Pause", "", "work"),
	call("admin.vm.Kill", "", "work"),
	call("admin.vm.Shutdown", "force+wait", "work"),
	{udev: "block-add sys-usb loop0 8388608 w /home/user/demo.luks"},
	call("admin.vm.device.block.Available", "", "sys-usb"),
	attachStep("work", "sys-usb", "loop0", "no"), // work is halted
	call("admin.vm.Start", "", "work"),
	call("admin.vm.CurrentState", "", "work"),
	attachStep("work", "sys-usb", "loop0", "no"),
	attachStep("work", "sys-usb", "loop0", "yes"), // twice
	call("admin.vm.device.block.List", "", "work"),
	call("admin.vm.device.block.Attached", "", "work"),
	attachStep("work", "sys-usb", "sdb", "no"), // a read-only device
	call("admin.vm.device.block.Detach", "sys-usb+loop0", "work"),
	call("admin.vm.device.block.Detach", "sys-usb+loop0", "work"), // twice
	{udev: "block-remove sys-usb loop0"},
	call("admin.vm.Pause", "", "work"),
	call("admin.vm.Unpause", "", "work"),
	call("admin.vm.Unpause", "", "work"), // not paused
	call("admin.vm.Shutdown", "wait", "work"),
	call("admin.vm.Start", "", "mediator"),
	call("admin.vm.Kill", "", "mediator"),
	call("admin.vm.Shutdown", "force+wait", "sys-usb"),
	call("admin.vm.Start", "", "sys-usb"),
	{udev: "block-add sys-usb sdc 1048576 w QEMU_HARDDISK (QCRYPTUSB)"},
	call("admin.vm.device.block.Available", "", "sys-usb"),
	call("admin.vm.Frobnicate", "", "work"),
}

// vworld is an Admin API server with its event stream and its udev stand-in.
type vworld struct {
	c    *qubes.Client
	udev func(line string) error
	evs  chan qubes.Event
	n    int
}

func (w *vworld) subscribe(t *testing.T) {
	w.evs = make(chan qubes.Event, 4096)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	ready := make(chan struct{})
	go func() {
		for ev := range w.c.Events(ctx, qubes.DefaultBackoff) {
			if ev.Kind == qubes.EventResync {
				close(ready)
				continue
			}
			w.evs <- ev
		}
	}()
	select {
	case <-ready:
	case <-time.After(time.Minute):
		t.Fatal("no event stream")
	}
}

// barrier collects the events up to a dom0 feature change of its own.
func (w *vworld) barrier(t *testing.T) []qubes.Event {
	w.n++
	val := fmt.Sprint(w.n)
	if _, err := w.c.Call(context.Background(), qubes.Request{Method: "admin.vm.feature.Set", Arg: "vectors-barrier", Dest: "dom0", Payload: []byte(val)}); err != nil {
		t.Fatalf("barrier: %v", err)
	}
	var out []qubes.Event
	timeout := time.After(time.Minute)
	for {
		select {
		case ev := <-w.evs:
			if ev.Subject == "dom0" && ev.Name == "domain-feature-set:vectors-barrier" && ev.Args["value"] == val {
				return out
			}
			out = append(out, ev)
		case <-timeout:
			t.Fatalf("barrier %s did not come back", val)
		}
	}
}

// transcript runs the script and renders what happened.
func (w *vworld) transcript(t *testing.T, dialect qubessim.Dialect) string {
	w.subscribe(t)
	w.barrier(t)
	var b strings.Builder
	for _, s := range vectorScript {
		if s.udev != "" {
			fmt.Fprintf(&b, "udev %s\n", s.udev)
			if err := w.udev(s.udev); err != nil {
				t.Fatalf("udev %s: %v", s.udev, err)
			}
		} else {
			payload := s.payload
			if dialect == qubessim.R43 && s.payload43 != "" {
				payload = s.payload43
			}
			req := qubes.Request{Method: s.method, Arg: s.arg, Dest: s.dest, Payload: []byte(payload)}
			raw, _ := req.Encode()
			fmt.Fprintf(&b, "> %q\n", raw)
			resp, err := rawCall(w.c.Socket(), raw)
			if err != nil {
				t.Fatalf("%s: %v", s.method, err)
			}
			fmt.Fprintf(&b, "< %s\n", normalizeReply(s.method, resp))
		}
		var lines []string
		for _, ev := range w.barrier(t) {
			if line, ok := normalizeEvent(ev); ok {
				lines = append(lines, line)
			}
		}
		for _, l := range sortBursts(lines) {
			fmt.Fprintf(&b, "@ %s\n", l)
		}
	}
	return b.String()
}

// rawCall sends one request and returns the raw reply.
func rawCall(socket string, req []byte) ([]byte, error) {
	c, err := net.Dial("unix", socket)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(2 * time.Minute)); err != nil {
		return nil, err
	}
	if _, err := c.Write(req); err != nil {
		return nil, err
	}
	if err := c.(*net.UnixConn).CloseWrite(); err != nil {
		return nil, err
	}
	return io.ReadAll(c)
}

var (
	uuidRE  = regexp.MustCompile(`[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}`)
	numRE   = regexp.MustCompile(`=[0-9]+`)
	fieldRE = regexp.MustCompile(`[^ =]+='[^']*'|[^ =]+=[^ ]*`)
)

// normalizeReply renders a reply with what differs between runs replaced: uuids, the
// numbers of a running qube's CurrentState, and the order of a device line's fields
// (both servers build them from dictionaries).
func normalizeReply(method string, resp []byte) string {
	s := string(resp)
	if strings.HasPrefix(s, "0\x00") {
		body := s[2:]
		body = uuidRE.ReplaceAllString(body, "UUID")
		if method == "admin.vm.CurrentState" && !strings.Contains(body, "power_state=Halted") {
			body = numRE.ReplaceAllString(body, "=N")
		}
		if strings.HasPrefix(method, "admin.vm.device.block.") {
			var lines []string
			for _, l := range strings.Split(body, "\n") {
				lines = append(lines, sortFields(l))
			}
			body = strings.Join(lines, "\n")
		}
		return fmt.Sprintf("0 %q", body)
	}
	return fmt.Sprintf("%q", s)
}

// sortFields orders "HEAD k=v k='v w' ... description=free text" (R4.2 keeps the free
// text last).
func sortFields(line string) string {
	head, rest, ok := strings.Cut(line, " ")
	if !ok {
		return line
	}
	desc := ""
	if i := strings.Index(rest, "description="); i >= 0 {
		rest, desc = rest[:i], rest[i:]
	}
	fields := fieldRE.FindAllString(rest, -1)
	sort.Strings(fields)
	out := append([]string{head}, fields...)
	if desc != "" {
		out = append(out, desc)
	}
	return strings.Join(out, " ")
}

// sortBursts orders each run of device-added or device-removed events of one qube: R4.3
// announces a burst of them (after a backend stops or starts) in the order of a Python
// set, which changes from run to run.
func sortBursts(lines []string) []string {
	kind := func(l string) string {
		f := strings.Fields(l)
		if len(f) > 1 && (f[1] == "device-added:block" || f[1] == "device-removed:block") {
			return f[0] + " " + f[1]
		}
		return ""
	}
	for i := 0; i < len(lines); {
		j := i + 1
		for k := kind(lines[i]); k != "" && j < len(lines) && kind(lines[j]) == k; {
			j++
		}
		sort.Strings(lines[i:j])
		i = j
	}
	return lines
}

// The events qcrypt reads, and those that show their order.
var vectorEvents = map[string]bool{
	"domain-pre-start": true, "domain-start": true, "domain-start-failed": true, "domain-pre-shutdown": true,
	"domain-shutdown": true, "domain-stopped": true, "domain-paused": true, "domain-unpaused": true,
	"domain-pre-paused": true, "domain-pre-unpaused": true,
	"device-pre-attach:block": true, "device-attach:block": true, "device-pre-detach:block": true, "device-detach:block": true,
	"device-list-change:block": true, "device-added:block": true, "device-removed:block": true,
	"domain-qdb-change:/qubes-block-devices": true,
}

func normalizeEvent(ev qubes.Event) (string, bool) {
	if !vectorEvents[ev.Name] {
		return "", false
	}
	keys := make([]string, 0, len(ev.Args))
	for k := range ev.Args {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	line := ev.Subject + " " + ev.Name
	for _, k := range keys {
		line += " " + k + "=" + ev.Args[k]
	}
	return line, true
}

// realVWorld starts the real qubesd (no simulator: nothing runs in its qubes).
func realVWorld(t *testing.T, dir string, dialect qubessim.Dialect) *vworld {
	srv := &qubessim.RealServer{Dir: dir, Version: dialect, Socket: filepath.Join(t.TempDir(), "qubesd.sock"), Log: os.Stderr}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	c := qubes.NewClient(srv.Socket)
	c.SetTimeout(2 * time.Minute)
	return &vworld{c: c, udev: srv.Ctl}
}

// simVWorld starts the simulator's own server with real-qubesd's starting world.
func simVWorld(t *testing.T, dialect qubessim.Dialect) *vworld {
	f := simtest.Start(t, dialect)
	if err := f.SetupRealWorld(); err != nil {
		t.Fatal(err)
	}
	return &vworld{c: f.Client, udev: f.Udev}
}

func vectorFile(d qubessim.Dialect) string {
	return filepath.Join("testdata", "real-qubesd", string(d)+".txt")
}

var recordMu sync.Mutex

// TestRealQubesdVectors runs the script against the real qubesd and compares the
// transcript with the recorded one (QCRYPT_RECORD_VECTORS=1 records it instead).
func TestRealQubesdVectors(t *testing.T) {
	t.Parallel()
	dir := simtest.RealQubesd(t)
	for _, d := range []qubessim.Dialect{qubessim.R42, qubessim.R43} {
		t.Run(string(d), func(t *testing.T) {
			got := realVWorld(t, dir, d).transcript(t, d)
			if os.Getenv("QCRYPT_RECORD_VECTORS") == "1" {
				recordMu.Lock()
				defer recordMu.Unlock()
				if err := os.MkdirAll(filepath.Dir(vectorFile(d)), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(vectorFile(d), []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			compareTranscript(t, "the real qubesd", vectorFile(d), got)
		})
	}
}

// TestSimulatorAgreesWithRealQubesd holds the simulator against the recorded transcripts.
func TestSimulatorAgreesWithRealQubesd(t *testing.T) {
	t.Parallel()
	for _, d := range []qubessim.Dialect{qubessim.R42, qubessim.R43} {
		t.Run(string(d), func(t *testing.T) {
			got := simVWorld(t, d).transcript(t, d)
			compareTranscript(t, "the simulator", vectorFile(d), got)
		})
	}
}

func compareTranscript(t *testing.T, who, file, got string) {
	t.Helper()
	want, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("%v (record with make vectors)", err)
	}
	wl, gl := strings.Split(string(want), "\n"), strings.Split(got, "\n")
	for i := 0; i < len(wl) || i < len(gl); i++ {
		var w, g string
		if i < len(wl) {
			w = wl[i]
		}
		if i < len(gl) {
			g = gl[i]
		}
		if w != g {
			t.Fatalf("%s differs from %s at line %d:\nwant %s\ngot  %s\n(context: %q)", who, file, i+1, w, g, wl[max(0, i-3):min(len(wl), i+1)])
		}
	}
}
