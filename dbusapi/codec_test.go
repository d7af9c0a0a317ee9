package dbusapi

import (
	"encoding/binary"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/qcrypt/qcrypt/chains"
)

// fill gives every exported field of v (a pointer) a value that is not zero, different
// per field, and recurses into structs and lists: a field the codec does not carry does
// not survive a round trip.
func fill(v reflect.Value, seed *int, skip map[string]bool) {
	*seed++
	switch v.Kind() {
	case reflect.Pointer:
		fill(v.Elem(), seed, skip)
	case reflect.Struct:
		if v.Type() == reflect.TypeOf(time.Time{}) {
			v.Set(reflect.ValueOf(time.UnixMicro(int64(1_700_000_000_000_000 + *seed))))
			return
		}
		for i := 0; i < v.NumField(); i++ {
			if f := v.Type().Field(i); f.IsExported() && !skip[f.Name] {
				fill(v.Field(i), seed, skip)
			}
		}
	case reflect.String:
		v.SetString("s" + strings.Repeat("x", *seed))
	case reflect.Bool:
		v.SetBool(true)
	case reflect.Int, reflect.Int32, reflect.Int64:
		v.SetInt(int64(*seed))
	case reflect.Uint32, reflect.Uint64:
		v.SetUint(uint64(*seed))
	case reflect.Slice:
		s := reflect.MakeSlice(v.Type(), 2, 2)
		fill(s.Index(0), seed, skip)
		fill(s.Index(1), seed, skip)
		v.Set(s)
	case reflect.Map:
		m := reflect.MakeMap(v.Type())
		k, e := reflect.New(v.Type().Key()).Elem(), reflect.New(v.Type().Elem()).Elem()
		fill(k, seed, skip)
		fill(e, seed, skip)
		m.SetMapIndex(k, e)
		v.Set(m)
	}
}

// roundTrip sends an a{sv} through a real D-Bus marshalling, as it travels.
func roundTrip(t *testing.T, m map[string]dbus.Variant) map[string]dbus.Variant {
	t.Helper()
	msg := &dbus.Message{Type: dbus.TypeSignal, Headers: map[dbus.HeaderField]dbus.Variant{
		dbus.FieldPath: dbus.MakeVariant(dbus.ObjectPath("/x")), dbus.FieldInterface: dbus.MakeVariant("x.y"),
		dbus.FieldMember: dbus.MakeVariant("Z"), dbus.FieldSignature: dbus.MakeVariant(dbus.SignatureOf(m))}, Body: []any{m}}
	var b strings.Builder
	if err := msg.EncodeTo(&b, binary.LittleEndian); err != nil {
		t.Fatal(err)
	}
	back, err := dbus.DecodeMessage(strings.NewReader(b.String()))
	if err != nil {
		t.Fatal(err)
	}
	var out map[string]dbus.Variant
	if err := dbus.Store(back.Body, &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// Every a{sv} and property set qcryptd and qcryptctl exchange survives the trip whole:
// each field is declared once (codec.go) and read back by the same declaration.
func TestCodecsRoundTrip(t *testing.T) {
	tests := map[string]struct {
		skip map[string]bool // fields that travel elsewhere (path, descriptors)
		trip func(t *testing.T, in any) any
		zero func() any
	}{
		"ChainInfo": {nil, func(t *testing.T, in any) any {
			c := in.(*ChainInfo)
			var out ChainInfo
			if err := chainInfoCodec.read(roundTrip(t, chainInfoCodec.encode(c)), &out); err != nil {
				t.Fatal(err)
			}
			return &out
		}, func() any { return &ChainInfo{} }},
		"JobInfo": {map[string]bool{"ID": true}, func(t *testing.T, in any) any {
			var out JobInfo
			if err := jobInfoCodec.read(roundTrip(t, jobInfoCodec.encode(in.(*JobInfo))), &out); err != nil {
				t.Fatal(err)
			}
			return &out
		}, func() any { return &JobInfo{} }},
		"Status": {nil, func(t *testing.T, in any) any {
			out, err := StatusFromMap(roundTrip(t, StatusToMap(in.(*chains.Status))))
			if err != nil {
				t.Fatal(err)
			}
			return out
		}, func() any { return &chains.Status{} }},
		"Discovered": {nil, func(t *testing.T, in any) any {
			out, err := DiscoveredFromMap(roundTrip(t, DiscoveredToMap(*in.(*Discovered))))
			if err != nil {
				t.Fatal(err)
			}
			return &out
		}, func() any { return &Discovered{} }},
		"OpenOptions": {map[string]bool{"InjectKeys": true, "InjectStores": true}, func(t *testing.T, in any) any {
			out, err := OpenOptionsFromMap(roundTrip(t, OpenOptionsToMap(*in.(*chains.OpenOptions))))
			if err != nil {
				t.Fatal(err)
			}
			return &out
		}, func() any { return &chains.OpenOptions{} }},
		"CloseOptions": {nil, func(t *testing.T, in any) any {
			out, _, err := CloseOptionsFromMap(roundTrip(t, CloseOptionsToMap(*in.(*chains.CloseOptions))), false)
			if err != nil {
				t.Fatal(err)
			}
			return &out
		}, func() any { return &chains.CloseOptions{} }},
		"Spec": {map[string]bool{"Inject": true, "KeyEntropy": true, "ContainerEntropy": true, "Container": true,
			"Backups": true, "InjectKeys": true}, func(t *testing.T, in any) any {
			var out Spec
			if err := specCodec.accept(roundTrip(t, in.(*Spec).ToMap()), &out, "spec field"); err != nil {
				t.Fatal(err)
			}
			return &out
		}, func() any { return &Spec{} }},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			in := tc.zero()
			seed := 0
			fill(reflect.ValueOf(in), &seed, tc.skip)
			if out := tc.trip(t, in); !reflect.DeepEqual(out, in) {
				t.Errorf("sent %+v\ngot  %+v", in, out)
			}
		})
	}
	// stop travels only in CloseAll's options.
	o, stop, err := CloseOptionsFromMap(roundTrip(t, CloseAllOptionsToMap(chains.CloseOptions{Eject: true}, true)), true)
	if err != nil || !stop || !o.Eject {
		t.Errorf("CloseAll options: %+v stop=%v %v", o, stop, err)
	}
	var e *Error
	if _, _, err := CloseOptionsFromMap(CloseAllOptionsToMap(chains.CloseOptions{}, true), false); !errors.As(err, &e) || e.Name != InvalidArgs {
		t.Errorf("stop outside CloseAll: %v", err)
	}
}
