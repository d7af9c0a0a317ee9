package dbusapi

import (
	"fmt"
	"reflect"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/qcrypt/qcrypt/qubes"
)

// A codec is the one declaration of an a{sv} (or of an object's properties): every key
// once, with the struct field it carries. Encoding, both decodings and the list of keys
// all come from it, so a key cannot be added on one side only.
type codec[T any] []field[T]

// field binds a key to a struct field. ref points to a field whose type is the wire
// type; a field whose wire form differs (times, nested lists) has enc and dec instead.
type field[T any] struct {
	key      string
	ref      func(*T) any
	enc      func(*T) any
	dec      func(*T, dbus.Variant) error
	omitZero bool // left out of an encoding when zero
	optional bool // may be missing in what qcryptd sends
}

func (f field[T]) value(v *T) any {
	if f.enc != nil {
		return f.enc(v)
	}
	return reflect.ValueOf(f.ref(v)).Elem().Interface()
}

func (f field[T]) store(v *T, x dbus.Variant) error {
	if f.dec != nil {
		return f.dec(v, x)
	}
	return x.Store(f.ref(v))
}

// values are the wire values of v by key (for exported properties).
func (c codec[T]) values(v *T) map[string]any {
	m := make(map[string]any, len(c))
	for _, f := range c {
		m[f.key] = f.value(v)
	}
	return m
}

// encode renders v as an a{sv}.
func (c codec[T]) encode(v *T) map[string]dbus.Variant {
	m := make(map[string]dbus.Variant, len(c))
	for _, f := range c {
		x := f.value(v)
		if f.omitZero && reflect.ValueOf(x).IsZero() {
			continue
		}
		m[f.key] = dbus.MakeVariant(x)
	}
	return m
}

// keys lists the declared keys.
func (c codec[T]) keys() []string {
	out := make([]string, len(c))
	for i, f := range c {
		out[i] = f.key
	}
	return out
}

// read decodes what qcryptd sent: keys it does not know are skipped (a newer qcryptd),
// a missing key is an error unless optional, and every string is made safe to print.
func (c codec[T]) read(m map[string]dbus.Variant, v *T) error {
	for _, f := range c {
		if _, ok := m[f.key]; !ok && !f.optional {
			return fmt.Errorf("field %s is missing", f.key)
		}
	}
	return c.update(m, v)
}

// update applies the keys present in m (a PropertiesChanged signal's), as read does.
func (c codec[T]) update(m map[string]dbus.Variant, v *T) error {
	for _, f := range c {
		x, ok := m[f.key]
		if !ok {
			continue
		}
		if err := f.store(v, x); err != nil {
			return fmt.Errorf("field %s: %w", f.key, err)
		}
		if f.ref != nil {
			cleanValue(reflect.ValueOf(f.ref(v)).Elem())
		}
	}
	return nil
}

// accept decodes what a caller sent: a key not declared is refused (what names the
// kind of key in the error), every key may be missing, and nothing is changed: the
// values are validated as they are.
func (c codec[T]) accept(m map[string]dbus.Variant, v *T, what string) error {
	if err := knownKeys(m, what, c.keys()...); err != nil {
		return err
	}
	return c.acceptKnown(m, v, what)
}

// acceptKnown is accept for an a{sv} whose other keys are checked elsewhere.
func (c codec[T]) acceptKnown(m map[string]dbus.Variant, v *T, what string) error {
	for _, f := range c {
		x, ok := m[f.key]
		if !ok {
			continue
		}
		if err := f.store(v, x); err != nil {
			return Errorf(InvalidArgs, "%s %s: wrong type %s", what, f.key, x.Signature())
		}
	}
	return nil
}

func knownKeys(m map[string]dbus.Variant, what string, known ...string) error {
	for k := range m {
		ok := false
		for _, n := range known {
			ok = ok || n == k
		}
		if !ok {
			return Errorf(InvalidArgs, "unknown %s %q", what, qubes.Printable(k, 40))
		}
	}
	return nil
}

// cleanValue applies Clean to a string, or to each string of a list, map or struct.
func cleanValue(v reflect.Value) {
	switch v.Kind() {
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			if v.Field(i).CanSet() {
				cleanValue(v.Field(i))
			}
		}
	case reflect.String:
		v.SetString(Clean(v.String()))
	case reflect.Slice:
		for i := 0; i < v.Len(); i++ {
			cleanValue(v.Index(i))
		}
	case reflect.Map:
		if v.Type().Key().Kind() != reflect.String || v.Type().Elem().Kind() != reflect.String {
			return
		}
		clean := reflect.MakeMapWithSize(v.Type(), v.Len())
		for it := v.MapRange(); it.Next(); {
			clean.SetMapIndex(reflect.ValueOf(Clean(it.Key().String())).Convert(v.Type().Key()),
				reflect.ValueOf(Clean(it.Value().String())).Convert(v.Type().Elem()))
		}
		v.Set(clean)
	}
}

// usec is a time as microseconds since the epoch on the wire; 0 is the zero time.
func usec[T any](key string, ref func(*T) *time.Time) field[T] {
	return field[T]{key: key,
		enc: func(v *T) any {
			if t := *ref(v); !t.IsZero() {
				return uint64(t.UnixMicro())
			}
			return uint64(0)
		},
		dec: func(v *T, x dbus.Variant) error {
			var n uint64
			if err := x.Store(&n); err != nil {
				return err
			}
			if n != 0 {
				*ref(v) = time.UnixMicro(int64(n))
			}
			return nil
		}}
}
