package qubes_test

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim"
	"github.com/qcrypt/qcrypt/qubessim/simtest"
)

func TestMain(m *testing.M) { simtest.Main(m) }

// vector is one Admin API exchange, byte for byte. The same vector is checked on both
// sides: the client must send exactly req and read resp as check says; the simulator,
// in the state setup builds, must answer req with exactly resp.
type vector struct {
	name    string
	dialect qubessim.Dialect
	setup   func(t *testing.T, f *simtest.Fixture)
	call    func(ctx context.Context, c *qubes.Client) (any, error)
	req     string
	resp    string
	check   func(t *testing.T, got any, err error)
}

func wantErr(kind error) func(*testing.T, any, error) {
	return func(t *testing.T, _ any, err error) {
		t.Helper()
		if !errors.Is(err, kind) {
			t.Errorf("got %v, want %v", err, kind)
		}
	}
}

func wantValue(want any) func(*testing.T, any, error) {
	return func(t *testing.T, got any, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		if w, ok := want.(func(any) bool); ok {
			if !w(got) {
				t.Errorf("unexpected %+v", got)
			}
			return
		}
		if got != want {
			t.Errorf("got %+v, want %+v", got, want)
		}
	}
}

func loop0(t *testing.T, f *simtest.Fixture) {
	if r := f.Sh(t, "sys-usb", "losetup -f --show "+qubessim.DemoContainer); r.ExitCode != 0 {
		t.Fatalf("losetup: %s", r.Stderr)
	}
}

func loop0Attached(t *testing.T, f *simtest.Fixture) {
	loop0(t, f)
	ctx := context.Background()
	if err := f.Client.Start(ctx, "mediator"); err != nil {
		t.Fatal(err)
	}
	if err := f.Client.Attach(ctx, "mediator", qubes.DeviceRef{Backend: "sys-usb", Port: "loop0"}, true); err != nil {
		t.Fatal(err)
	}
}

func startMediator(t *testing.T, f *simtest.Fixture) {
	if err := f.Client.Start(context.Background(), "mediator"); err != nil {
		t.Fatal(err)
	}
}

var loopRef = qubes.DeviceRef{Backend: "sys-usb", Port: "loop0"}

func vectors() []vector {
	both := []qubessim.Dialect{qubessim.R42, qubessim.R43}
	var vs []vector
	for _, d := range both {
		vs = append(vs,
			vector{name: "CurrentState", dialect: d, req: "admin.vm.CurrentState+ dom0 name work\x00",
				resp:  "0\x00mem=0 mem_static_max=0 cputime=0 power_state=Halted",
				call:  func(ctx context.Context, c *qubes.Client) (any, error) { return c.CurrentState(ctx, "work") },
				check: wantValue("Halted")},
			vector{name: "default_user", dialect: d, req: "admin.vm.property.Get+default_user dom0 name work\x00",
				resp:  "0\x00default=True type=str user",
				call:  func(ctx context.Context, c *qubes.Client) (any, error) { return c.DefaultUser(ctx, "work") },
				check: wantValue("user")},
			vector{name: "qrexec_timeout", dialect: d, req: "admin.vm.property.Get+qrexec_timeout dom0 name work\x00",
				resp:  "0\x00default=True type=int 60",
				call:  func(ctx context.Context, c *qubes.Client) (any, error) { return c.QrexecTimeout(ctx, "work") },
				check: wantValue(60)},
			vector{name: "default_qrexec_timeout", dialect: d, req: "admin.property.Get+default_qrexec_timeout dom0 name dom0\x00",
				resp:  "0\x00default=True type=int 60",
				call:  func(ctx context.Context, c *qubes.Client) (any, error) { return c.DefaultQrexecTimeout(ctx) },
				check: wantValue(60)},
			vector{name: "unknown property", dialect: d, req: "admin.vm.property.Get+nope dom0 name work\x00",
				resp:  "2\x00QubesNoSuchPropertyError\x00\x00Invalid property 'nope' of work\x00",
				call:  func(ctx context.Context, c *qubes.Client) (any, error) { return c.VMProperty(ctx, "work", "nope") },
				check: wantErr(qubes.ErrNoSuchProperty)},
			vector{name: "unknown qube", dialect: d, req: "admin.vm.CurrentState+ dom0 name nosuchvm\x00",
				resp:  "2\x00QubesVMNotFoundError\x00\x00No such domain: 'nosuchvm'\x00",
				call:  func(ctx context.Context, c *qubes.Client) (any, error) { return c.CurrentState(ctx, "nosuchvm") },
				check: wantErr(qubes.ErrNoSuchVM)},
			vector{name: "start running is a no-op", dialect: d, req: "admin.vm.Start+ dom0 name sys-usb\x00", resp: "0\x00",
				call:  func(ctx context.Context, c *qubes.Client) (any, error) { return nil, c.Start(ctx, "sys-usb") },
				check: wantValue(nil)},
			vector{name: "shutdown halted", dialect: d, req: "admin.vm.Shutdown+force+wait dom0 name work\x00",
				resp: "2\x00QubesVMNotStartedError\x00\x00Domain is powered off: 'work'\x00",
				call: func(ctx context.Context, c *qubes.Client) (any, error) {
					return nil, c.Shutdown(ctx, "work", true, true)
				},
				check: wantErr(qubes.ErrNotRunning)},
			vector{name: "unpause not paused", dialect: d, req: "admin.vm.Unpause+ dom0 name sys-usb\x00",
				resp:  "2\x00QubesVMNotPausedError\x00\x00Domain is not paused: 'sys-usb'\x00",
				call:  func(ctx context.Context, c *qubes.Client) (any, error) { return nil, c.Unpause(ctx, "sys-usb") },
				check: wantErr(qubes.ErrNotPaused)},
			vector{name: "pause halted", dialect: d, req: "admin.vm.Pause+ dom0 name work\x00",
				resp:  "2\x00QubesVMNotRunningError\x00\x00Domain not running (either powered off or paused): 'work'\x00",
				call:  func(ctx context.Context, c *qubes.Client) (any, error) { return nil, c.Pause(ctx, "work") },
				check: wantErr(qubes.ErrNotRunning)},
			vector{name: "kill halted", dialect: d, req: "admin.vm.Kill+ dom0 name work\x00",
				resp:  "2\x00QubesVMNotStartedError\x00\x00Domain is powered off: 'work'\x00",
				call:  func(ctx context.Context, c *qubes.Client) (any, error) { return nil, c.Kill(ctx, "work") },
				check: wantErr(qubes.ErrNotRunning)},
			vector{name: "global property not on dom0 is an empty reply", dialect: d, req: "admin.property.Get+default_qrexec_timeout dom0 name work\x00", resp: "",
				call: func(ctx context.Context, c *qubes.Client) (any, error) {
					return c.Call(ctx, qubes.Request{Method: "admin.property.Get", Arg: "default_qrexec_timeout", Dest: "work"})
				},
				check: wantErr(qubes.ErrEmptyResponse)},
			vector{name: "unknown method is an empty reply", dialect: d, req: "admin.vm.Frobnicate+ dom0 name work\x00", resp: "",
				call: func(ctx context.Context, c *qubes.Client) (any, error) {
					return c.Call(ctx, qubes.Request{Method: "admin.vm.Frobnicate", Dest: "work"})
				},
				check: wantErr(qubes.ErrEmptyResponse)},
			vector{name: "bad shutdown argument is an empty reply", dialect: d, req: "admin.vm.Shutdown+now dom0 name sys-usb\x00", resp: "",
				call: func(ctx context.Context, c *qubes.Client) (any, error) {
					return c.Call(ctx, qubes.Request{Method: "admin.vm.Shutdown", Arg: "now", Dest: "sys-usb"})
				},
				check: wantErr(qubes.ErrEmptyResponse)},
		)
	}
	vs = append(vs,
		vector{name: "List", dialect: qubessim.R42, req: "admin.vm.List+ dom0 name dom0\x00",
			resp: "0\x00dom0 class=AdminVM state=Running\nmediator class=AppVM state=Halted\nsys-usb class=DispVM state=Running\nwork class=AppVM state=Halted\n",
			call: func(ctx context.Context, c *qubes.Client) (any, error) { return c.ListVMs(ctx) },
			check: wantValue(func(v any) bool {
				vms := v.([]qubes.VM)
				return len(vms) == 4 && vms[3] == qubes.VM{Name: "work", Class: "AppVM", State: "Halted"}
			})},
		vector{name: "List", dialect: qubessim.R43, req: "admin.vm.List+ dom0 name dom0\x00",
			resp: "0\x00dom0 class=AdminVM state=Running uuid=00000000-0000-0000-0000-000000000000\nmediator class=AppVM state=Halted uuid=" + qubessim.UUIDFor("mediator") +
				"\nsys-usb class=DispVM state=Running uuid=" + qubessim.UUIDFor("sys-usb") + "\nwork class=AppVM state=Halted uuid=" + qubessim.UUIDFor("work") + "\n",
			call: func(ctx context.Context, c *qubes.Client) (any, error) { return c.ListVMs(ctx) },
			check: wantValue(func(v any) bool {
				vms := v.([]qubes.VM)
				return len(vms) == 4 && vms[3].UUID == qubessim.UUIDFor("work")
			})},
		vector{name: "device API probe", dialect: qubessim.R42, req: "admin.vm.device.block.Attached+ dom0 name dom0\x00", resp: "",
			call: func(ctx context.Context, c *qubes.Client) (any, error) {
				c.SetDeviceAPI(qubes.DeviceAPIUnknown)
				return c.DeviceAPI(ctx)
			},
			check: wantValue(qubes.DeviceAPIOld)},
		vector{name: "device API probe", dialect: qubessim.R43, req: "admin.vm.device.block.Attached+ dom0 name dom0\x00", resp: "0\x00",
			call: func(ctx context.Context, c *qubes.Client) (any, error) {
				c.SetDeviceAPI(qubes.DeviceAPIUnknown)
				return c.DeviceAPI(ctx)
			},
			check: wantValue(qubes.DeviceAPINew)},
		vector{name: "Available", dialect: qubessim.R42, setup: loop0, req: "admin.vm.device.block.Available+ dom0 name sys-usb\x00",
			resp: "0\x00loop0 mode=w size=8388608 device_node=/dev/loop0 description=/home/user/demo.luks\n",
			call: func(ctx context.Context, c *qubes.Client) (any, error) { return c.Available(ctx, "sys-usb") },
			check: wantValue(func(v any) bool {
				d := v.([]qubes.BlockDevice)
				return len(d) == 1 && d[0] == qubes.BlockDevice{DeviceRef: loopRef, Description: "/home/user/demo.luks", Mode: "w", Size: 8388608}
			})},
		vector{name: "Available", dialect: qubessim.R43, setup: loop0, req: "admin.vm.device.block.Available+ dom0 name sys-usb\x00",
			resp: "0\x00loop0::0 backend_domain='sys-usb' devclass='block' device_id=':0' interfaces='b******' manufacturer='hosted by sys-usb' port_id='loop0' serial='/home/user/demo.luks'\n",
			call: func(ctx context.Context, c *qubes.Client) (any, error) { return c.Available(ctx, "sys-usb") },
			check: wantValue(func(v any) bool {
				d := v.([]qubes.BlockDevice)
				return len(d) == 1 && d[0] == qubes.BlockDevice{DeviceRef: loopRef, Description: "/home/user/demo.luks", Size: -1}
			})},
		vector{name: "Attach read-only", dialect: qubessim.R42, setup: func(t *testing.T, f *simtest.Fixture) { loop0(t, f); startMediator(t, f) },
			req: "admin.vm.device.block.Attach+sys-usb+loop0 dom0 name mediator\x00read-only=yes", resp: "0\x00",
			call: func(ctx context.Context, c *qubes.Client) (any, error) {
				return nil, c.Attach(ctx, "mediator", loopRef, true)
			},
			check: wantValue(nil)},
		vector{name: "Attach read-only", dialect: qubessim.R43, setup: func(t *testing.T, f *simtest.Fixture) { loop0(t, f); startMediator(t, f) },
			req:  "admin.vm.device.block.Attach+sys-usb+loop0 dom0 name mediator\x00device_id='*' port_id='loop0' devclass='block' backend_domain='sys-usb' mode='manual' frontend_domain='mediator' _read-only='yes'",
			resp: "0\x00", call: func(ctx context.Context, c *qubes.Client) (any, error) {
				return nil, c.Attach(ctx, "mediator", loopRef, true)
			},
			check: wantValue(nil)},
		vector{name: "Attach to a halted frontend", dialect: qubessim.R42, setup: loop0,
			req:  "admin.vm.device.block.Attach+sys-usb+loop0 dom0 name work\x00read-only=no",
			resp: "2\x00QubesVMNotRunningError\x00\x00VM not running, can only attach device with persistent flag\x00",
			call: func(ctx context.Context, c *qubes.Client) (any, error) {
				return nil, c.Attach(ctx, "work", loopRef, false)
			},
			check: wantErr(qubes.ErrNotRunning)},
		vector{name: "Attach twice", dialect: qubessim.R42, setup: loop0Attached,
			req:  "admin.vm.device.block.Attach+sys-usb+loop0 dom0 name mediator\x00read-only=yes",
			resp: "2\x00DeviceAlreadyAttached\x00\x00'device sys-usb:loop0 of class block already attached to mediator'\x00",
			call: func(ctx context.Context, c *qubes.Client) (any, error) {
				return nil, c.Attach(ctx, "mediator", loopRef, true)
			},
			check: wantErr(qubes.ErrAlreadyAttached)},
		vector{name: "Attach twice", dialect: qubessim.R43, setup: loop0Attached,
			req:  "admin.vm.device.block.Attach+sys-usb+loop0 dom0 name mediator\x00device_id='*' port_id='loop0' devclass='block' backend_domain='sys-usb' mode='manual' frontend_domain='mediator' _read-only='yes'",
			resp: "2\x00DeviceAlreadyAttached\x00\x00'device sys-usb:loop0::0 of class block already attached to mediator'\x00",
			call: func(ctx context.Context, c *qubes.Client) (any, error) {
				return nil, c.Attach(ctx, "mediator", loopRef, true)
			},
			check: wantErr(qubes.ErrAlreadyAttached)},
		vector{name: "List attached", dialect: qubessim.R42, setup: loop0Attached, req: "admin.vm.device.block.List+ dom0 name mediator\x00",
			resp: "0\x00sys-usb+loop0 read-only=yes frontend-dev=xvdi persistent=no\n",
			call: func(ctx context.Context, c *qubes.Client) (any, error) { return c.Attached(ctx, "mediator") },
			check: wantValue(func(v any) bool {
				a := v.([]qubes.Attachment)
				return len(a) == 1 && a[0] == qubes.Attachment{DeviceRef: loopRef, Frontend: "mediator", ReadOnly: true, FrontendDev: "xvdi"}
			})},
		vector{name: "List attached", dialect: qubessim.R43, setup: loop0Attached, req: "admin.vm.device.block.Attached+ dom0 name mediator\x00",
			resp: "0\x00sys-usb+loop0::0 _frontend-dev='xvdi' _read-only='yes' backend_domain='sys-usb' devclass='block' device_id=':0' frontend_domain='mediator' mode='manual' port_id='loop0'\n",
			call: func(ctx context.Context, c *qubes.Client) (any, error) { return c.Attached(ctx, "mediator") },
			check: wantValue(func(v any) bool {
				a := v.([]qubes.Attachment)
				return len(a) == 1 && a[0] == qubes.Attachment{DeviceRef: loopRef, Frontend: "mediator", ReadOnly: true, FrontendDev: "xvdi"}
			})},
		vector{name: "Detach", dialect: qubessim.R42, setup: loop0Attached, req: "admin.vm.device.block.Detach+sys-usb+loop0 dom0 name mediator\x00", resp: "0\x00",
			call: func(ctx context.Context, c *qubes.Client) (any, error) {
				return nil, c.Detach(ctx, "mediator", loopRef)
			}, check: wantValue(nil)},
		vector{name: "Detach not attached", dialect: qubessim.R42, setup: startMediator, req: "admin.vm.device.block.Detach+sys-usb+loop0 dom0 name mediator\x00",
			resp: "2\x00DeviceNotAttached\x00\x00'device loop0 of class block not attached to mediator'\x00",
			call: func(ctx context.Context, c *qubes.Client) (any, error) {
				return nil, c.Detach(ctx, "mediator", loopRef)
			}, check: wantErr(qubes.ErrNotAttached)},
		vector{name: "Detach not attached", dialect: qubessim.R43, setup: startMediator, req: "admin.vm.device.block.Detach+sys-usb+loop0 dom0 name mediator\x00",
			resp: "2\x00DeviceNotAssigned\x00\x00'block device loop0 not attached to mediator'\x00",
			call: func(ctx context.Context, c *qubes.Client) (any, error) {
				return nil, c.Detach(ctx, "mediator", loopRef)
			}, check: wantErr(qubes.ErrNotAttached)},
	)
	return vs
}

// fakeQubesd answers one connection with resp after checking the request bytes.
func fakeQubesd(t *testing.T, wantReq, resp string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qubesd.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			got, _ := io.ReadAll(c)
			if string(got) != wantReq {
				t.Errorf("client sent %q, want %q", got, wantReq)
			} else {
				if _, err := c.Write([]byte(resp)); err != nil {
					t.Errorf("cannot answer: %v", err)
				}
			}
			c.Close()
		}
	}()
	return path
}

func rawCall(t *testing.T, socket, req string) string {
	t.Helper()
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	if err := c.(*net.UnixConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	return string(got)
}

func TestConformanceClient(t *testing.T) {
	t.Parallel()
	for _, v := range vectors() {
		t.Run(string(v.dialect)+"/"+v.name, func(t *testing.T) {
			c := qubes.NewClient(fakeQubesd(t, v.req, v.resp))
			if v.dialect == qubessim.R42 {
				c.SetDeviceAPI(qubes.DeviceAPIOld)
			} else {
				c.SetDeviceAPI(qubes.DeviceAPINew)
			}
			got, err := v.call(context.Background(), c)
			v.check(t, got, err)
		})
	}
}

func TestConformanceSimulator(t *testing.T) {
	t.Parallel()
	for _, v := range vectors() {
		t.Run(string(v.dialect)+"/"+v.name, func(t *testing.T) {
			f := simtest.StartDemo(t, v.dialect)
			if v.setup != nil {
				v.setup(t, f)
			}
			if got := rawCall(t, f.Socket(), v.req); got != v.resp {
				t.Errorf("simulator answered\n%q\nwant\n%q", got, v.resp)
			}
		})
	}
}

func TestSimulatorFraming(t *testing.T) {
	t.Parallel()
	f := simtest.StartDemo(t, qubessim.R42)
	tests := map[string]struct{ req, resp string }{
		"split on first plus, keyword adminvm": {"admin.vm.List+ dom0 keyword adminvm\x00", "0\x00dom0 class=AdminVM state=Running\nmediator class=AppVM state=Halted\nsys-usb class=DispVM state=Running\nwork class=AppVM state=Halted\n"},
		"no plus at all":                       {"admin.vm.List dom0 name work\x00", "0\x00work class=AppVM state=Halted\n"},
		"arg to List is refused":               {"admin.vm.List+x dom0 name dom0\x00", ""},
		"no NUL: framing error":                {"admin.vm.List+ dom0 name dom0", ""},
		"unknown source":                       {"admin.vm.List+ evil name dom0\x00", "2\x00QubesVMNotFoundError\x00\x00No such domain: 'evil'\x00"},
		"events with payload refused":          {"admin.Events+ dom0 name dom0\x00x", ""},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if got := rawCall(t, f.Socket(), tc.req); got != tc.resp {
				t.Errorf("got %q, want %q", got, tc.resp)
			}
		})
	}
	t.Run("over 64 KiB is aborted without answer", func(t *testing.T) {
		c, err := net.Dial("unix", f.Socket())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
			t.Fatal(err)
		}
		// The server stops reading and closes: the write or the read may see a reset,
		// but no byte may come back.
		_, _ = c.Write([]byte("admin.vm.List+ dom0 name dom0\x00" + string(make([]byte, qubes.MaxRequest)))) // may be reset
		if err := c.(*net.UnixConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if got, _ := io.ReadAll(c); len(got) != 0 {
			t.Errorf("got %q", got)
		}
	})
}
