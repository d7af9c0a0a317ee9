package qubes

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// The parsers see bytes a hostile qube can influence; they must never panic, never
// return more than they were given, and keep what they return valid.

func FuzzParseResponse(f *testing.F) {
	for _, s := range []string{"", "0\x00", "0\x00body", "2\x00QubesException\x00\x00m\x00", "2\x00DeviceNotAttached\x00\x00'x'\x00a\x00", "1\x00\x00e\x00\x00", "2\x00"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		body, err := ParseResponse(raw)
		if err == nil && !bytes.Equal(append([]byte{'0', 0}, body...), raw) {
			t.Fatalf("OK body does not match input")
		}
		var qe *Error
		if errors.As(err, &qe) && (!isPythonIdent(qe.Type) || Printable(qe.Message, 1<<20) != qe.Message && len(qe.Message) <= 512) {
			t.Fatalf("exception fields not sanitised: %#v", qe)
		}
	})
}

func FuzzEventReader(f *testing.F) {
	for _, s := range []string{
		"1\x00\x00connection-established\x00\x00",
		"1\x00work\x00device-attach:block\x00device\x00sys-usb:sda::None\x00options\x00{}\x00\x00",
		"1\x00sys-usb\x00device-removed:block\x00port\x00sys-usb:loop1\x00\x00",
		"1\x00work\x00domain-start\x00start_guid\x00True\x00\x001\x00",
		"2\x00QubesVMNotFoundError\x00\x00No such domain\x00",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		er := NewEventReader(bytes.NewReader(raw))
		for i := 0; i < 1000; i++ {
			ev, err := er.Next()
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, ErrProtocol) && !errors.As(err, new(*Error)) {
					t.Fatalf("unexpected error type %T: %v", err, err)
				}
				return
			}
			if ev.Subject != "" && ValidateVMName(ev.Subject) != nil {
				t.Fatalf("invalid subject passed: %q", ev.Subject)
			}
			if ev.Device != (DeviceRef{}) && checkRef(ev.Device) != nil {
				t.Fatalf("invalid device passed: %+v", ev.Device)
			}
		}
	})
}

func FuzzDeviceLines(f *testing.F) {
	for _, s := range []string{
		"sda mode=w size=1024000 device_node=/dev/sda description=SanDisk_Cruzer (MYLABEL)\n",
		"sda::None device_id=':None' port_id='sda' devclass='block' backend_domain='sys-usb' serial='S' name='N'\n",
		"sys-usb+sda read-only=no frontend-dev=xvdi persistent=no\n",
		"sys-usb+sda::None port_id='sda' frontend_domain='work' _read-only='no' _frontend-dev='xvdi'\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		for _, parse := range []func(string, []byte) ([]BlockDevice, error){ParseAvailableOld, ParseAvailableNew} {
			devs, err := parse("sys-usb", raw)
			if err != nil {
				continue
			}
			for _, d := range devs {
				if checkRef(d.DeviceRef) != nil || d.Backend != "sys-usb" || Printable(d.Description, 1<<20) != d.Description {
					t.Fatalf("invalid device passed: %+v", d)
				}
			}
		}
		for _, parse := range []func(string, []byte) ([]Attachment, error){ParseAttachedOld, ParseAttachedNew} {
			atts, err := parse("work", raw)
			if err != nil {
				continue
			}
			for _, a := range atts {
				if checkRef(a.DeviceRef) != nil || a.Frontend != "work" || a.FrontendDev != "" && ValidatePort(a.FrontendDev) != nil {
					t.Fatalf("invalid attachment passed: %+v", a)
				}
			}
		}
		if props, err := ParseProperties(string(raw)); err == nil {
			for k := range props {
				if !validPropKey(k) {
					t.Fatalf("invalid key passed: %q", k)
				}
			}
		}
	})
}
