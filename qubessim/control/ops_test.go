package control

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		line string
		want Request
		ok   bool
		err  string
	}{
		{line: "ping", want: Request{Op: Ping}, ok: true},
		{line: "add-vm work", want: Request{Op: AddVM, VM: "work", Class: "AppVM", User: "user"}, ok: true},
		{line: "add-vm tpl TemplateVM root", want: Request{Op: AddVM, VM: "tpl", Class: "TemplateVM", User: "root"}, ok: true},
		{line: "plug sys-usb /img Disk", want: Request{Op: Plug, VM: "sys-usb", Image: "/img", Desc: "Disk"}, ok: true},
		{line: "plug-ro sys-usb /img", want: Request{Op: Plug, VM: "sys-usb", Image: "/img", RO: true}, ok: true},
		{line: "unplug sys-usb sda", want: Request{Op: Unplug, VM: "sys-usb", Port: "sda"}, ok: true},
		{line: "describe sys-usb sda New", want: Request{Op: Describe, VM: "sys-usb", Port: "sda", Desc: "New"}, ok: true},
		{line: "fault admin.vm.Start exception QubesException no work", ok: true,
			want: Request{Op: SetFault, Fault: &Fault{Method: "admin.vm.Start", Type: "QubesException", Msg: "no", Dest: "work"}}},
		{line: "fault admin.vm.List delay 250", ok: true,
			want: Request{Op: SetFault, Fault: &Fault{Method: "admin.vm.List", Delay: 250 * time.Millisecond}}},
		{line: "fault admin.vm.List hold", ok: true, want: Request{Op: SetFault, Fault: &Fault{Method: "admin.vm.List", Held: true}}},
		{line: "qrexec-fault work exit 126", ok: true, want: Request{Op: SetQrexec, VM: "work", Qrexec: &QrexecFault{Exit: 126}}},
		{line: "qrexec-fault work none", ok: true, want: Request{Op: SetQrexec, VM: "work", Qrexec: &QrexecFault{}}},
		{line: "kernel-fault work mount hang", ok: true, want: Request{Op: SetKernel, Kernel: &KernelFault{VM: "work", Op: "mount", Hang: true}}},
		{line: "wait-fault", ok: true, want: Request{Op: WaitFault, Count: 120}},
		{line: "wait-fault 5", ok: true, want: Request{Op: WaitFault, Count: 5}},
		{line: "calls", ok: true, want: Request{Op: Calls}},
		{line: "latency 3ms 100ms", ok: true, want: Request{Op: Latency, AdminLatency: 3 * time.Millisecond, QrexecLatency: 100 * time.Millisecond}},
		{line: "flood work 10", ok: true, want: Request{Op: Flood, VM: "work", Count: 10}},
		{line: "restart-qubesd", ok: true, want: Request{Op: RestartQubesd}},
		// Bad arguments name what is wrong.
		{line: "plug sys-usb", ok: true, err: "missing arguments"},
		{line: "fault admin.vm.List sometimes", ok: true, err: "kind is empty, exception, delay or hold"},
		{line: "fault admin.vm.List exception T", ok: true, err: "exception needs TYPE MESSAGE"},
		{line: "fault admin.vm.List delay soon", ok: true, err: `delay MS: not a number: "soon"`},
		{line: "qrexec-fault work exit x", ok: true, err: `exit CODE: not a number: "x"`},
		{line: "qrexec-fault work exit", ok: true, err: "hang, exit CODE, start-fail REASON or none"},
		{line: "kernel-fault work mount maybe", ok: true, err: "hang or fail"},
		{line: "latency 3ms -1s", ok: true, err: `not two durations: "3ms" "-1s"`},
		{line: "flood work many", ok: true, err: `the count N is not a number: "many"`},
		// Not control operations: the Admin API's, make-disk, and those only the
		// simulator's own clients send.
		{line: "start work"}, {line: "list"}, {line: "make-disk /img 1 L"},
		{line: "exec work"}, {line: "qrexec-ready work"}, {line: "ping-ro"}, {line: "nonsense"},
	} {
		t.Run(tc.line, func(t *testing.T) {
			req, ok, err := Parse(strings.Fields(tc.line))
			if ok != tc.ok {
				t.Fatalf("ok = %v, want %v", ok, tc.ok)
			}
			if tc.err != "" {
				if err == nil || err.Error() != tc.err {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(req, tc.want) {
				t.Errorf("req = %+v, want %+v", req, tc.want)
			}
			if ok {
				if err := req.check(0); err != nil {
					t.Errorf("a parsed request fails its check: %v", err)
				}
			}
		})
	}
}

func TestCheckRefusesIncompleteRequests(t *testing.T) {
	for _, tc := range []struct {
		req    Request
		passed int
		want   string
	}{
		{Request{Op: "format-disk"}, 0, `unknown control operation "format-disk"`},
		{Request{Op: Exec, VM: "work"}, 2, "exec needs stdin, stdout and stderr"},
		{Request{Op: SetFault}, 0, "no fault given"},
		{Request{Op: SetQrexec, VM: "work"}, 0, "no qrexec fault given"},
		{Request{Op: SetKernel}, 0, "no kernel fault given"},
	} {
		if err := tc.req.check(tc.passed); err == nil || err.Error() != tc.want {
			t.Errorf("%+v: err = %v, want %q", tc.req, err, tc.want)
		}
	}
	if err := (Request{Op: Exec}).check(3); err != nil {
		t.Errorf("exec with its stdio: %v", err)
	}
}
