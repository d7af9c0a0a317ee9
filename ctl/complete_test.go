package ctl

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/qcrypt/qcrypt/qubes"
)

func TestComplete(t *testing.T) {
	qubesd := func(context.Context) ([]qubes.VM, error) {
		return []qubes.VM{{Name: "work", Class: "AppVM"}, {Name: "dom0", Class: qubes.ClassAdminVM}, {Name: "sys-usb", Class: "AppVM"}}, nil
	}
	tests := []struct {
		words []string
		want  string
	}{
		{[]string{""}, strings.Join(commandNames(), " ")},
		{[]string{"op"}, strings.Join(commandNames(), " ")},
		{[]string{"help", ""}, strings.Join(commandNames(), " ")},
		{[]string{"completion", ""}, "bash zsh"},
		{[]string{"plan", ""}, "open close"},
		{[]string{"keystore", ""}, "unlock lock status init"},
		{[]string{"plan", "open", ""}, "demo usb vault@work sys-usb work"},
		{[]string{"open", ""}, "demo usb vault@work sys-usb work"},
		{[]string{"open", "--mp", "/mnt/x", ""}, "demo usb vault@work sys-usb work"},
		{[]string{"open", "sys-usb", ""}, ""},                             // the file inside sys-usb
		{[]string{"open", "sys-usb", "/c.luks", "k", ""}, "sys-usb work"}, // destinations
		{[]string{"open", "--inj", ""}, "sys-usb work"},
		{[]string{"open", "--inj", "work", ""}, filesCandidate},
		{[]string{"open", "--cy", "work", "--type plain", ""}, "demo usb vault@work sys-usb work"},
		{[]string{"luks-init", "--fs", ""}, "btrfs ext4"},
		{[]string{"luks-init", "--bak", ""}, filesCandidate},
		{[]string{"luks-init", ""}, "sys-usb work"},
		{[]string{"help", "--man", ""}, "qcryptctl qcrypt.ini"},
		{[]string{"cancel", ""}, "demo usb vault@work"},
		{[]string{"close", "--s"}, "--json --force --shutdown-target --eject --help"},
		{[]string{"nosuch", ""}, ""},
	}
	for _, tc := range tests {
		var out bytes.Buffer
		a := &app{out: &out, err: &out, ctx: context.Background(), qubes: qubesd,
			running: func() (API, error) { return &fakeAPI{}, nil }}
		if code := a.main(append([]string{completeCommand}, tc.words...)); code != 0 {
			t.Errorf("%q: exit %d", tc.words, code)
		}
		if got := strings.Join(strings.Fields(out.String()), " "); got != tc.want {
			t.Errorf("%q: %q, want %q", tc.words, got, tc.want)
		}
	}
}
