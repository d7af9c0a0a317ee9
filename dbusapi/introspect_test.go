package dbusapi

import (
	"encoding/xml"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/godbus/dbus/v5"
	"github.com/godbus/dbus/v5/introspect"
)

// exportedMethods lists what godbus exports of v: methods whose last result is *dbus.Error.
func exportedMethods(v any) []string {
	t := reflect.TypeOf(v)
	errType := reflect.TypeOf((*dbus.Error)(nil))
	var out []string
	for i := 0; i < t.NumMethod(); i++ {
		m := t.Method(i)
		if n := m.Type.NumOut(); n > 0 && m.Type.Out(n-1) == errType {
			out = append(out, m.Name)
		}
	}
	sort.Strings(out)
	return out
}

func parse(t *testing.T, iface string) introspect.Interface {
	t.Helper()
	var n introspect.Node
	if err := xml.Unmarshal([]byte(nodeXML([]string{iface}, nil)), &n); err != nil {
		t.Fatal(err)
	}
	return n.Interfaces[0]
}

func TestIntrospectionMatchesExports(t *testing.T) {
	tests := map[string]struct {
		xml   string
		obj   any
		props map[string]any
	}{
		ManagerInterface: {ManagerXML, &manager{}, map[string]any{"Version": "", "Target": "", "Summary": ""}},
		ChainInterface:   {ChainXML, &chainObject{}, chainInfoCodec.values(&ChainInfo{})},
		JobInterface:     {JobXML, &jobObject{}, jobInfoCodec.values(&JobInfo{})},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			iface := parse(t, tc.xml)
			if iface.Name != name {
				t.Errorf("interface %q", iface.Name)
			}
			var methods []string
			for _, m := range iface.Methods {
				methods = append(methods, m.Name)
				for _, a := range m.Args {
					if a.Name == "" || a.Name != strings.ToLower(a.Name) {
						t.Errorf("%s: argument %q must be named lower_snake", m.Name, a.Name)
					}
				}
			}
			sort.Strings(methods)
			if got := exportedMethods(tc.obj); !reflect.DeepEqual(got, methods) {
				t.Errorf("exported %v, described %v", got, methods)
			}
			var props, want []string
			for _, p := range iface.Properties {
				props = append(props, p.Name)
				if v, ok := tc.props[p.Name]; ok && dbus.SignatureOf(v).String() != p.Type {
					t.Errorf("property %s is %s, described %s", p.Name, dbus.SignatureOf(v), p.Type)
				}
			}
			for k := range tc.props {
				want = append(want, k)
			}
			sort.Strings(props)
			sort.Strings(want)
			if !reflect.DeepEqual(props, want) {
				t.Errorf("properties %v, described %v", want, props)
			}
		})
	}
}

func TestMethodSignaturesMatch(t *testing.T) {
	// The out signature of each exported method is what the XML says.
	iface := parse(t, ManagerXML)
	typ := reflect.TypeOf(&manager{})
	for _, m := range iface.Methods {
		gm, ok := typ.MethodByName(m.Name)
		if !ok {
			continue
		}
		var in, out string
		for _, a := range m.Args {
			if a.Direction == "out" {
				out += a.Type
			} else {
				in += a.Type
			}
		}
		var gin, gout string
		for i := 1; i < gm.Type.NumIn(); i++ {
			if gm.Type.In(i) == reflect.TypeOf(dbus.Sender("")) {
				continue
			}
			gin += dbus.SignatureOfType(gm.Type.In(i)).String()
		}
		for i := 0; i < gm.Type.NumOut()-1; i++ {
			gout += dbus.SignatureOfType(gm.Type.Out(i)).String()
		}
		if in != gin || out != gout {
			t.Errorf("%s: Go (%s)->(%s), XML (%s)->(%s)", m.Name, gin, gout, in, out)
		}
	}
}

func TestErrorNames(t *testing.T) {
	for err, want := range map[error]string{
		Errorf(NoSuchChain, "x"):           "org.qcrypt.Qcryptd1.Error.NoSuchChain",
		ErrAccessDenied:                    "org.freedesktop.DBus.Error.AccessDenied",
		strings.NewReader("").UnreadByte(): "org.qcrypt.Qcryptd1.Error.Failed",
	} {
		if got := toDBus(err).Name; got != want {
			t.Errorf("%v: %s, want %s", err, got, want)
		}
	}
}

func TestChainPathEscaping(t *testing.T) {
	for name, want := range map[string]string{"demo": "/org/qcrypt/Qcryptd1/chain/demo", "demo@work": "/org/qcrypt/Qcryptd1/chain/demo_40work", "a-b.c": "/org/qcrypt/Qcryptd1/chain/a_2db_2ec"} {
		p := ChainPath(name)
		if string(p) != want || !p.IsValid() {
			t.Errorf("%s: %s", name, p)
		}
		if back := chainNameOf(p); back != name {
			t.Errorf("%s: back %s", name, back)
		}
	}
}
