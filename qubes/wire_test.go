package qubes

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestRequestEncode(t *testing.T) {
	t.Parallel()
	tests := map[string]struct {
		req  Request
		want string
	}{
		"no arg, no payload":    {Request{Method: "admin.vm.List", Dest: "dom0"}, "admin.vm.List+ dom0 name dom0\x00"},
		"start":                 {Request{Method: "admin.vm.Start", Dest: "some-vm"}, "admin.vm.Start+ dom0 name some-vm\x00"},
		"arg with plus":         {Request{Method: "admin.vm.Shutdown", Arg: "force+wait", Dest: "work"}, "admin.vm.Shutdown+force+wait dom0 name work\x00"},
		"device attach payload": {Request{Method: "admin.vm.device.block.Attach", Arg: "sys-usb+sda", Dest: "work", Payload: []byte("read-only=yes")}, "admin.vm.device.block.Attach+sys-usb+sda dom0 name work\x00read-only=yes"},
		"events":                {Request{Method: "admin.Events", Dest: "dom0"}, "admin.Events+ dom0 name dom0\x00"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := tc.req.Encode()
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestRequestEncodeRefuses(t *testing.T) {
	t.Parallel()
	tests := map[string]Request{
		"space in dest":    {Method: "admin.vm.List", Dest: "a b"},
		"empty dest":       {Method: "admin.vm.List"},
		"space in arg":     {Method: "admin.vm.property.Get", Arg: "a b", Dest: "work"},
		"NUL in arg":       {Method: "admin.vm.property.Get", Arg: "a\x00", Dest: "work"},
		"bad method":       {Method: "admin vm", Dest: "work"},
		"over 64 KiB":      {Method: "x.y", Dest: "work", Payload: make([]byte, MaxRequest)},
		"dest not a qube":  {Method: "admin.vm.List", Dest: "-x"},
		"reserved dest":    {Method: "admin.vm.List", Dest: "default"},
		"dest ends in -dm": {Method: "admin.vm.List", Dest: "work-dm"},
	}
	for name, req := range tests {
		t.Run(name, func(t *testing.T) {
			if _, err := req.Encode(); err == nil {
				t.Errorf("Encode(%+v) succeeded", req)
			}
		})
	}
}

func TestRequestAtLimit(t *testing.T) {
	t.Parallel()
	head := "x.y+ dom0 name work\x00"
	req := Request{Method: "x.y", Dest: "work", Payload: make([]byte, MaxRequest-len(head))}
	if _, err := req.Encode(); err != nil {
		t.Fatalf("a request of exactly %d bytes must pass: %v", MaxRequest, err)
	}
}

func TestParseRequest(t *testing.T) {
	t.Parallel()
	tests := map[string]struct {
		raw     string
		want    Request
		wantSrc string
		bad     bool
	}{
		"first plus splits":    {raw: "admin.vm.Shutdown+force+wait dom0 name work\x00", want: Request{Method: "admin.vm.Shutdown", Arg: "force+wait", Dest: "work", Payload: []byte{}}, wantSrc: "dom0"},
		"no plus":              {raw: "admin.vm.List dom0 name dom0\x00", want: Request{Method: "admin.vm.List", Dest: "dom0", Payload: []byte{}}, wantSrc: "dom0"},
		"keyword adminvm":      {raw: "mgmt.success+arg src keyword adminvm\x00payload", want: Request{Method: "mgmt.success", Arg: "arg", Dest: "dom0", Payload: []byte("payload")}, wantSrc: "src"},
		"payload with NULs":    {raw: "a.b+ dom0 name w\x00x\x00y", want: Request{Method: "a.b", Dest: "w", Payload: []byte("x\x00y")}, wantSrc: "dom0"},
		"no NUL":               {raw: "admin.vm.List+ dom0 name dom0", bad: true},
		"three fields":         {raw: "admin.vm.List+ dom0 name\x00", bad: true},
		"other dest type":      {raw: "admin.vm.List+ dom0 uuid x\x00", bad: true},
		"keyword not adminvm":  {raw: "admin.vm.List+ dom0 keyword dom0\x00", bad: true},
		"non-ASCII in header":  {raw: "admin.vm.List+\xff dom0 name dom0\x00", bad: true},
		"space in dest (rest)": {raw: "a.b+ dom0 name a b\x00", want: Request{Method: "a.b", Dest: "a b", Payload: []byte{}}, wantSrc: "dom0"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, src, err := ParseRequest([]byte(tc.raw))
			if tc.bad {
				if err == nil {
					t.Fatalf("accepted %q", tc.raw)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Method != tc.want.Method || got.Arg != tc.want.Arg || got.Dest != tc.want.Dest || !bytes.Equal(got.Payload, tc.want.Payload) || src != tc.wantSrc {
				t.Errorf("got %+v src %q, want %+v src %q", got, src, tc.want, tc.wantSrc)
			}
		})
	}
}

func TestParseResponse(t *testing.T) {
	t.Parallel()
	tests := map[string]struct {
		raw      string
		body     string
		kind     error
		typ, msg string
	}{
		"ok empty":             {raw: "0\x00", body: ""},
		"ok body":              {raw: "0\x00src: b'src', dest: b'dest'", body: "src: b'src', dest: b'dest'"},
		"qubes exception":      {raw: "2\x00QubesException\x00\x00qubes-exception\x00", kind: ErrQubes, typ: "QubesException", msg: "qubes-exception"},
		"vm not found":         {raw: "2\x00QubesVMNotFoundError\x00\x00No such domain: 'nosuchvm'\x00", kind: ErrNoSuchVM, typ: "QubesVMNotFoundError", msg: "No such domain: 'nosuchvm'"},
		"keyerror quotes gone": {raw: "2\x00DeviceNotAttached\x00\x00'device sda of class block not attached to work'\x00", kind: ErrNotAttached, typ: "DeviceNotAttached", msg: "device sda of class block not attached to work"},
		"already attached":     {raw: "2\x00DeviceAlreadyAttached\x00\x00'Device sys-usb:sda::None already attached to other'\x00", kind: ErrAlreadyAttached, msg: "Device sys-usb:sda::None already attached to other", typ: "DeviceAlreadyAttached"},
		"trailing args":        {raw: "2\x00QubesValueError\x00tb\x00fmt %s\x00arg1\x00", kind: ErrInvalidValue, typ: "QubesValueError", msg: "fmt %s"},
		"main protocol error":  {raw: "2\x00ProtocolError\x00\x00no such method\x00", kind: ErrRefused, typ: "ProtocolError", msg: "no such method"},
		"not halted":           {raw: "2\x00QubesVMNotHaltedError\x00\x00x\x00", kind: ErrNotHalted, typ: "QubesVMNotHaltedError", msg: "x"},
		"control bytes shown":  {raw: "2\x00QubesException\x00\x00a\x1b[31mb\nc\x00", kind: ErrQubes, typ: "QubesException", msg: "a?[31mb?c"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			body, err := ParseResponse([]byte(tc.raw))
			if tc.kind == nil {
				if err != nil || string(body) != tc.body {
					t.Fatalf("got %q, %v; want %q", body, err, tc.body)
				}
				return
			}
			var qe *Error
			if !errors.As(err, &qe) {
				t.Fatalf("got %v, want *Error", err)
			}
			if !errors.Is(err, tc.kind) || qe.Type != tc.typ || qe.Message != tc.msg {
				t.Errorf("got %#v, want kind %v type %q msg %q", qe, tc.kind, tc.typ, tc.msg)
			}
		})
	}
}

func TestParseResponseFailures(t *testing.T) {
	t.Parallel()
	tests := map[string]struct {
		raw  string
		want error
	}{
		"empty is never success": {"", ErrEmptyResponse},
		"one byte":               {"0", ErrProtocol},
		"no NUL after status":    {"0x", ErrProtocol},
		"event on call":          {"1\x00\x00e\x00\x00", ErrProtocol},
		"unknown status":         {"3\x00", ErrProtocol},
		"truncated exception":    {"2\x00QubesException\x00", ErrProtocol},
		"unterminated message":   {"2\x00QubesException\x00\x00msg", ErrProtocol},
		"bad exception type":     {"2\x00Bad Type\x00\x00m\x00", ErrProtocol},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := ParseResponse([]byte(tc.raw))
			if !errors.Is(err, tc.want) {
				t.Errorf("got %v, want %v", err, tc.want)
			}
		})
	}
}

func TestPrintable(t *testing.T) {
	t.Parallel()
	if got := Printable("ok\x00\xff"+strings.Repeat("a", 20), 10); got != "ok??aaaaaa..." {
		t.Errorf("got %q", got)
	}
}

func TestValidateVMName(t *testing.T) {
	t.Parallel()
	good := []string{"dom0", "sys-usb", "work", "a", "A_b-9", strings.Repeat("a", 31)}
	bad := []string{"", "1abc", "-x", "a b", "a.b", "a/b", "none", "default", "Domain-0", "x-dm", strings.Repeat("a", 32), "lost+found", "wörk"}
	for _, n := range good {
		if err := ValidateVMName(n); err != nil {
			t.Errorf("%q: %v", n, err)
		}
	}
	for _, n := range bad {
		if ValidateVMName(n) == nil {
			t.Errorf("%q accepted", n)
		}
	}
}
