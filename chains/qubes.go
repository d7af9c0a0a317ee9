package chains

import (
	"context"
	"io"

	"github.com/qcrypt/qcrypt/qubes"
)

// Qubes is what the engine needs of the Admin API (*qubes.Client has it).
type Qubes interface {
	ListVMs(ctx context.Context) ([]qubes.VM, error)
	Start(ctx context.Context, vm string) error
	Shutdown(ctx context.Context, vm string, force, wait bool) error
	DefaultUser(ctx context.Context, vm string) (string, error)
	Available(ctx context.Context, backend string) ([]qubes.BlockDevice, error)
	Attached(ctx context.Context, frontend string) ([]qubes.Attachment, error)
	Attach(ctx context.Context, frontend string, dev qubes.DeviceRef, readOnly bool) error
	Detach(ctx context.Context, frontend string, dev qubes.DeviceRef) error
	DeviceAPI(ctx context.Context) (qubes.DeviceAPI, error)
}

// Runner runs a root shell script in a qube (*qubes.Runner has it). input follows the
// script on stdin.
type Runner interface {
	Run(ctx context.Context, vm, script string, input io.Reader) (qubes.Result, error)
}
