package ctl

import (
	"fmt"
	"os"
	"strings"

	"github.com/qcrypt/qcrypt/chains"
)

func cmdCheck(a *app, p *parsed) error {
	if len(p.args) > 1 {
		return usageErr("check takes at most one TARGET or DIR")
	}
	target := ""
	if len(p.args) == 1 {
		target = p.args[0]
	}
	var errs []string
	// A directory is read with the caller's own rights, here; qcryptd reads only its
	// config root for others than root. Without qcryptd, the same checks run here (it is
	// not started for them: it would open its chains).
	var api API
	if local := strings.Contains(target, "/") && os.Geteuid() != 0; !local {
		if c, err := a.running(); err == nil {
			api = c
		}
	}
	if api != nil {
		a.api = api
		var err error
		if _, errs, err = api.Check(a.ctx, target); err != nil {
			return err
		}
	} else {
		errs = chains.CheckTarget(target, a.configDir, os.Geteuid() == 0)
	}
	ok := len(errs) == 0
	if p.flags["--json"] {
		if errs == nil {
			errs = []string{}
		}
		a.printJSON(checkJSON{ok, errs})
	} else if ok {
		fmt.Fprintln(a.out, "All good.")
	} else {
		for _, e := range errs {
			fmt.Fprintln(a.out, "ERROR:", e)
		}
	}
	if !ok {
		return exitCode(ExitFailed)
	}
	return nil
}
