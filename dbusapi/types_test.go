package dbusapi

import (
	"strings"
	"testing"
)

func TestSpecFromMapRefuses(t *testing.T) {
	good := Spec{SourceVM: "sys-usb", File: "/c.luks", Key: "k", Destinations: []string{"mediator", "work"}}
	tests := map[string]struct {
		change func(*Spec)
		want   string
	}{
		"dom0 as destination":    {func(s *Spec) { s.Destinations = []string{"mediator", "dom0"} }, "dom0 is never part of a chain"},
		"dom0 as source":         {func(s *Spec) { s.SourceVM = "dom0" }, "dom0 is never part of a chain"},
		"relative file":          {func(s *Spec) { s.File = "c.luks" }, "must be absolute"},
		"bad key id":             {func(s *Spec) { s.Key = "../k" }, "must match"},
		"crypt options of other": {func(s *Spec) { s.CryptOptions = map[string]string{"sys-usb": "--type plain"} }, "not a destination"},
	}
	if _, _, err := SpecFromMap(good.ToMap()); err != nil {
		t.Fatalf("good spec refused: %v", err)
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			s := good
			s.Destinations = append([]string{}, good.Destinations...)
			tc.change(&s)
			_, _, err := SpecFromMap(s.ToMap())
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want %q", err, tc.want)
			}
		})
	}
}
