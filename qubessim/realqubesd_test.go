package qubessim_test

import (
	"strings"
	"testing"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim"
	"github.com/qcrypt/qcrypt/qubessim/simtest"
)

// TestRealQubesdMirror: behind the real qubesd the simulated qubes follow what qubesd
// does, and what runs in them reaches qubesd.
func TestRealQubesdMirror(t *testing.T) {
	t.Parallel()
	for _, d := range []qubessim.Dialect{qubessim.R42, qubessim.R43} {
		t.Run(string(d), func(t *testing.T) {
			f := simtest.StartReal(t, d)
			loop := qubes.DeviceRef{Backend: "sys-usb", Port: "loop0"}
			// A loop device made in sys-usb is in qubesd when the command returns.
			ok(t, f, "sys-usb", "losetup -f --show "+qubessim.DemoContainer)
			devs, err := f.Client.Available(ctx, "sys-usb")
			if err != nil || len(devs) != 1 || devs[0].DeviceRef != loop || devs[0].Description != qubessim.DemoContainer {
				t.Fatalf("Available after losetup: %+v %v", devs, err)
			}
			// A qube qubesd has started runs commands at once; a disk it attached is there.
			mustStart(t, f, "mediator")
			if err := f.Client.Attach(ctx, "mediator", loop, true); err != nil {
				t.Fatal(err)
			}
			if out := ok(t, f, "mediator", openCmd+" && ls /dev/mapper"); out != "demo\n" {
				t.Errorf("mediator's mappers: %q", out)
			}
			// Shut down with the disk attached and started again: no disk (a fresh domain).
			if err := f.Client.Shutdown(ctx, "mediator", false, true); err != nil {
				t.Fatal(err)
			}
			mustStart(t, f, "mediator")
			if r := f.Sh(t, "mediator", openCmd); r.ExitCode == 0 {
				t.Error("mediator has its disk after its restart")
			}
			if att, err := f.Client.Attached(ctx, "mediator"); err != nil || len(att) != 0 {
				t.Errorf("qubesd lists %v %v attached to the restarted mediator", att, err)
			}
			mustStart(t, f, "work")
			// A killed qube is gone for qrexec.
			if err := f.Client.Kill(ctx, "work"); err != nil {
				t.Fatal(err)
			}
			if _, err := f.Runner.Run(ctx, "work", "true", nil); err == nil {
				t.Error("a command ran in the killed work")
			}
			// qubesd restarted: the qubes keep running and their devices stay known.
			if err := f.RestartQubesd(); err != nil {
				t.Fatal(err)
			}
			if out := ok(t, f, "sys-usb", "losetup -a"); !strings.Contains(out, qubessim.DemoContainer) {
				t.Errorf("sys-usb after the restart: %q", out)
			}
			if devs, err := f.Client.Available(ctx, "sys-usb"); err != nil || len(devs) != 1 {
				t.Errorf("Available after the restart: %+v %v", devs, err)
			}
		})
	}
}
