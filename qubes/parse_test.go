package qubes

import (
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"
)

func TestParseVMList(t *testing.T) {
	t.Parallel()
	tests := map[string]struct {
		body string
		want []VM
	}{
		"R4.1/R4.2": {
			body: "dom0 class=AdminVM state=Running\nsome-vm class=AppVM state=Running\n",
			want: []VM{{Name: "dom0", Class: "AdminVM", State: "Running"}, {Name: "some-vm", Class: "AppVM", State: "Running"}},
		},
		"R4.3 with uuid": {
			body: "dom0 class=AdminVM state=Running uuid=00000000-0000-0000-0000-000000000000\ntest-vm1 class=AppVM state=Halted uuid=1d63ec4d-3e2a-4d4a-8f7a-2c3b4d5e6f70\n",
			want: []VM{{Name: "dom0", Class: "AdminVM", State: "Running", UUID: "00000000-0000-0000-0000-000000000000"}, {Name: "test-vm1", Class: "AppVM", State: "Halted", UUID: "1d63ec4d-3e2a-4d4a-8f7a-2c3b4d5e6f70"}},
		},
		"unknown keys ignored": {
			body: "work class=AppVM future=1 state=Paused\n",
			want: []VM{{Name: "work", Class: "AppVM", State: "Paused"}},
		},
		"empty": {body: "", want: nil},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got, err := ParseVMList([]byte(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
	for _, bad := range []string{"1bad class=AppVM state=Running\n", "work class=AppVM\n", "work class=AppVM state=Exploded\n", "work class=App;VM state=Running\n", "work class=AppVM state=Running uuid=x\n"} {
		if _, err := ParseVMList([]byte(bad)); !errors.Is(err, ErrProtocol) {
			t.Errorf("%q: got %v, want protocol error", bad, err)
		}
	}
}

func TestParseProperty(t *testing.T) {
	t.Parallel()
	tests := map[string]Property{
		"default=True type=str user":    {Default: true, Type: "str", Value: "user"},
		"default=True type=int 60":      {Default: true, Type: "int", Value: "60"},
		"default=False type=vm ":        {Type: "vm", Value: ""},
		"default=True type=str a b c":   {Default: true, Type: "str", Value: "a b c"},
		"default=False type=label blue": {Type: "label", Value: "blue"},
	}
	for body, want := range tests {
		got, err := ParseProperty([]byte(body))
		if err != nil || got != want {
			t.Errorf("%q: got %+v, %v; want %+v", body, got, err, want)
		}
	}
	for _, bad := range []string{"", "default=True", "default=Maybe type=str x", "default=True kind=str x", "default=True type=s;r x"} {
		if _, err := ParseProperty([]byte(bad)); !errors.Is(err, ErrProtocol) {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestParseAvailableOld(t *testing.T) {
	t.Parallel()
	body := "sda mode=w size=1024000 device_node=/dev/sda description=SanDisk_Cruzer (MYLABEL)\n" +
		"sda1 size=0 device_node=/dev/sda1 mode=r description=SanDisk_Cruzer (MY_LAB__EL)\n" +
		"loop12\n" +
		"dm-0 description=a=b c\n"
	got, err := ParseAvailableOld("sys-usb", []byte(body))
	if err != nil {
		t.Fatal(err)
	}
	want := []BlockDevice{
		{DeviceRef: DeviceRef{"sys-usb", "dm-0"}, Description: "a=b c", Size: -1},
		{DeviceRef: DeviceRef{"sys-usb", "loop12"}, Size: -1},
		{DeviceRef: DeviceRef{"sys-usb", "sda"}, Description: "SanDisk_Cruzer (MYLABEL)", Mode: "w", Size: 1024000},
		{DeviceRef: DeviceRef{"sys-usb", "sda1"}, Description: "SanDisk_Cruzer (MY_LAB__EL)", Mode: "r", Size: 0},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v\nwant %+v", got, want)
	}
	for _, bad := range []string{"SDA description=x\n", "sda mode=x\n", "sda size=-1\n", "sda size=1e3\n", "averyveryverylongport\n", "../x\n"} {
		if _, err := ParseAvailableOld("sys-usb", []byte(bad)); !errors.Is(err, ErrProtocol) {
			t.Errorf("%q: got %v", bad, err)
		}
	}
}

func TestParseAvailableNew(t *testing.T) {
	t.Parallel()
	body := "sda::None device_id=':None' port_id='sda' devclass='block' backend_domain='sys-usb' name='MYLABEL' manufacturer='hosted by sys-usb' serial='SanDisk Cruzer' interfaces='b******'\n" +
		"loop12::12 device_id=':12' port_id='loop12' devclass='block' backend_domain='sys-usb' manufacturer='hosted by sys-usb' serial='/home/user/disk.img' interfaces='b******' attachment='work'\n" +
		"dev1\n"
	got, err := ParseAvailableNew("sys-usb", []byte(body))
	if err != nil {
		t.Fatal(err)
	}
	want := []BlockDevice{
		{DeviceRef: DeviceRef{"sys-usb", "dev1"}, Size: -1},
		{DeviceRef: DeviceRef{"sys-usb", "loop12"}, Description: "/home/user/disk.img", Size: -1, Frontend: "work"},
		{DeviceRef: DeviceRef{"sys-usb", "sda"}, Description: "SanDisk Cruzer (MYLABEL)", Size: -1},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v\nwant %+v", got, want)
	}
	for name, bad := range map[string]string{
		"port mismatch":    "sda::None port_id='sdb'\n",
		"backend mismatch": "sda::None backend_domain='other'\n",
		"bad attachment":   "sda::None attachment='-x'\n",
		"unterminated":     "sda::None serial='x\n",
		"bad port":         "SDA::None\n",
	} {
		if _, err := ParseAvailableNew("sys-usb", []byte(bad)); !errors.Is(err, ErrProtocol) {
			t.Errorf("%s: got %v", name, err)
		}
	}
}

func TestParseAttached(t *testing.T) {
	t.Parallel()
	old, err := ParseAttachedOld("work", []byte("sys-usb+sda read-only=no frontend-dev=xvdi persistent=no\nmediator+dm-0 read-only=yes frontend-dev=xvdj persistent=no\n"))
	if err != nil {
		t.Fatal(err)
	}
	neu, err := ParseAttachedNew("work", []byte("sys-usb+sda::None device_id=':None' port_id='sda' devclass='block' backend_domain='sys-usb' mode='manual' frontend_domain='work' _read-only='no' _frontend-dev='xvdi'\n"+
		"mediator+dm-0:0 device_id=':0' port_id='dm-0' devclass='block' backend_domain='mediator' mode='manual' frontend_domain='work' _read-only='yes' _frontend-dev='xvdj'\n"))
	if err != nil {
		t.Fatal(err)
	}
	want := []Attachment{
		{DeviceRef: DeviceRef{"mediator", "dm-0"}, Frontend: "work", ReadOnly: true, FrontendDev: "xvdj"},
		{DeviceRef: DeviceRef{"sys-usb", "sda"}, Frontend: "work", FrontendDev: "xvdi"},
	}
	if !reflect.DeepEqual(old, want) || !reflect.DeepEqual(neu, want) {
		t.Errorf("old %+v\nnew %+v\nwant %+v", old, neu, want)
	}
	for _, bad := range []string{"sys-usb read-only=no\n", "sys-usb+sda read-only=perhaps\n", "sys-usb+sda frontend-dev=../x\n", "-x+sda\n"} {
		if _, err := ParseAttachedOld("work", []byte(bad)); !errors.Is(err, ErrProtocol) {
			t.Errorf("%q: got %v", bad, err)
		}
	}
	if _, err := ParseAttachedNew("work", []byte("sys-usb+sda::None frontend_domain='other'\n")); !errors.Is(err, ErrProtocol) {
		t.Errorf("frontend mismatch accepted")
	}
}

func TestParseProperties(t *testing.T) {
	t.Parallel()
	got, err := ParseProperties(`a='1' b='it\'s' c='x y' d=''`)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"a": "1", "b": "it's", "c": "x y", "d": ""}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	round, err := ParseProperties(FormatProperties(want))
	if err != nil || !reflect.DeepEqual(round, want) {
		t.Errorf("round trip: %v %v", round, err)
	}
	for _, bad := range []string{"a", "a='1", "a='1' a='2'", "a b='1'", "a='1' b", "a='\x01'"} {
		if _, err := ParseProperties(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestEventReader(t *testing.T) {
	t.Parallel()
	stream := "1\x00\x00connection-established\x00\x00" +
		"1\x00\x00some-event\x00arg1\x00value1\x00\x00" +
		"1\x00some-vm\x00some-event\x00arg_without_value\x00\x00arg2\x00value\x00\x00" +
		"1\x00some-vm\x00other-event\x00\x00" +
		"1\x00work\x00domain-start\x00start_guid\x00True\x00\x00" +
		"1\x00work\x00device-attach:block\x00device\x00sys-usb:sda\x00options\x00{'read-only': 'no', 'frontend-dev': 'xvdi'}\x00\x00" +
		"1\x00work\x00device-attach:block\x00device\x00sys-usb:sda::None\x00options\x00{}\x00\x00" +
		"1\x00work\x00device-detach:block\x00port\x00sys-usb:sda\x00\x00" +
		"1\x00work\x00device-detach:block\x00device\x00sys-usb:loop0\x00\x00" +
		"1\x00sys-usb\x00device-added:block\x00device\x00sys-usb:loop12::12\x00\x00" +
		"1\x00sys-usb\x00device-removed:block\x00port\x00sys-usb:loop12\x00\x00" +
		"1\x00work\x00device-attach:block\x00device\x00evil\x00\x00" +
		"1\x00work\x00device-attach:pci\x00device\x00dom0:00_1f.0\x00\x00" +
		"1\x00\x00domain-add\x00vm\x00vault\x00\x00" +
		"1\x00\x00domain-delete\x00vm\x00vault\x00\x00" +
		"1\x00\x00domain-add\x00vm\x00../x\x00\x00"
	er := NewEventReader(strings.NewReader(stream))
	type ev struct {
		kind    EventKind
		subject string
		dev     DeviceRef
		args    map[string]string
	}
	want := []ev{
		{kind: EventResync, args: map[string]string{}},
		{kind: EventOther, args: map[string]string{"arg1": "value1"}},
		{kind: EventOther, subject: "some-vm", args: map[string]string{"arg_without_value": "", "arg2": "value"}},
		{kind: EventOther, subject: "some-vm", args: map[string]string{}},
		{kind: EventDomainStart, subject: "work", args: map[string]string{"start_guid": "True"}},
		{kind: EventDeviceAttach, subject: "work", dev: DeviceRef{"sys-usb", "sda"}},
		{kind: EventDeviceAttach, subject: "work", dev: DeviceRef{"sys-usb", "sda"}},
		{kind: EventDeviceDetach, subject: "work", dev: DeviceRef{"sys-usb", "sda"}},
		{kind: EventDeviceDetach, subject: "work", dev: DeviceRef{"sys-usb", "loop0"}},
		{kind: EventDeviceAdded, subject: "sys-usb", dev: DeviceRef{"sys-usb", "loop12"}},
		{kind: EventDeviceRemoved, subject: "sys-usb", dev: DeviceRef{"sys-usb", "loop12"}},
		{kind: EventDeviceAttach, subject: "work"}, // unparsable device: no ref
		{kind: EventOther, subject: "work"},
		{kind: EventDomainAdd, subject: "vault"},
		{kind: EventDomainDelete, subject: "vault"},
		{kind: EventOther}, // no qube name: ignored
	}
	for i, w := range want {
		got, err := er.Next()
		if err != nil {
			t.Fatalf("record %d: %v", i, err)
		}
		if got.Kind != w.kind || got.Subject != w.subject || got.Device != w.dev || w.args != nil && !reflect.DeepEqual(got.Args, w.args) {
			t.Errorf("record %d: got %+v, want %+v", i, got, w)
		}
	}
	if _, err := er.Next(); !errors.Is(err, io.EOF) {
		t.Errorf("end: got %v, want io.EOF", err)
	}
}

func TestEventReaderFailures(t *testing.T) {
	t.Parallel()
	tests := map[string]struct {
		stream string
		want   error
	}{
		"ends inside record":      {"1\x00work\x00domain-start\x00start_guid\x00", ErrProtocol},
		"ends inside field":       {"1\x00wo", ErrProtocol},
		"not an event":            {"0\x00", ErrProtocol},
		"exception instead":       {"2\x00QubesVMNotFoundError\x00\x00No such domain: 'x'\x00", ErrNoSuchVM},
		"bad subject":             {"1\x00../x\x00e\x00\x00", ErrProtocol},
		"oversized field":         {"1\x00\x00" + strings.Repeat("a", maxEventField+10) + "\x00\x00", ErrProtocol},
		"repeated keys count too": {"1\x00\x00e\x00" + strings.Repeat("k\x00v\x00", maxEventArgs+1) + "\x00", ErrProtocol},
		"at the argument limit":   {"1\x00\x00e\x00" + strings.Repeat("k\x00v\x00", maxEventArgs) + "\x00", nil},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			_, err := NewEventReader(strings.NewReader(tc.stream)).Next()
			if tc.want == nil {
				if err != nil {
					t.Fatalf("got %v", err)
				}
				return
			}
			if !errors.Is(err, tc.want) {
				t.Errorf("got %v, want %v", err, tc.want)
			}
		})
	}
}

func TestEncodeEventRoundTrip(t *testing.T) {
	t.Parallel()
	rec := EncodeEvent("work", "device-attach:block", "device", "sys-usb:sda", "options", "")
	ev, err := NewEventReader(strings.NewReader(string(rec))).Next()
	if err != nil || ev.Kind != EventDeviceAttach || ev.Device != (DeviceRef{"sys-usb", "sda"}) || ev.Args["options"] != "" {
		t.Errorf("got %+v, %v", ev, err)
	}
}
