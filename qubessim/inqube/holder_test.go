package inqube

import (
	"strings"
	"testing"
)

func TestPrefixMapperName(t *testing.T) {
	for _, tc := range []struct {
		args, want, action, name string
	}{
		{"open --key-file /k /dev/xvdi vault", "open --key-file /k /dev/xvdi work:vault", "open", "vault"},
		{"open -r --type luks2 --key-file /k /dev/loop0 v", "open -r --type luks2 --key-file /k /dev/loop0 work:v", "open", "v"},
		{"-q --key-file /k luksFormat /dev/loop0", "-q --key-file /k luksFormat /dev/loop0", "luksFormat", ""},
		{"luksOpen /dev/xvdi vault", "luksOpen /dev/xvdi work:vault", "luksOpen", "vault"},
		{"close vault", "close work:vault", "close", "vault"},
		{"status /dev/mapper/vault", "status work:vault", "status", "vault"},
		{"--pbkdf pbkdf2 status vault", "--pbkdf pbkdf2 status work:vault", "status", "vault"},
		{"open /dev/xvdi", "open /dev/xvdi", "open", ""},
		{"--version", "--version", "", ""},
	} {
		got, action, name := prefixMapperName(strings.Fields(tc.args), "work:")
		if strings.Join(got, " ") != tc.want || action != tc.action || name != tc.name {
			t.Errorf("%q: got %q %q %q, want %q %q %q", tc.args, got, action, name, tc.want, tc.action, tc.name)
		}
	}
}

func TestPlainNames(t *testing.T) {
	in := "/dev/mapper/work:vault is active and is in use.\n  device:  /dev/mapper/att#work#xvdi\n  loop:    /dev/loop0\n"
	want := "/dev/mapper/vault is active and is in use.\n  device:  /dev/xvdi\n  loop:    /dev/loop0\n"
	if got := plainNames(in, "work:"); got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}
