package ctl

import (
	"fmt"

	"github.com/godbus/dbus/v5"
	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
)

func cmdPlan(a *app, p *parsed) error {
	if len(p.args) < 2 || p.args[0] != "open" && p.args[0] != "close" {
		return usageErr("plan needs open|close and a chain or SOURCE_VM FILE KEY DST...")
	}
	op := p.args[0]
	p.args = p.args[1:]
	var options map[string]dbus.Variant
	if op == "open" {
		options = dbusapi.OpenOptionsToMap(chains.OpenOptions{Force: p.flags["--force"], Autostart: p.flags["--autostart"]})
	} else {
		options = dbusapi.CloseOptionsToMap(closeOptions(p))
	}
	api, err := a.client()
	if err != nil {
		return err
	}
	var steps []dbusapi.PlanStep
	if len(p.args) == 1 {
		steps, err = api.Plan(a.ctx, op, p.args[0], nil, options)
	} else {
		spec, serr := p.spec()
		if serr != nil {
			return usageErr(serr.Error())
		}
		steps, err = api.Plan(a.ctx, op, "", &spec, options)
	}
	if err != nil {
		return err
	}
	if p.flags["--json"] {
		out := []planStepJSON{}
		for _, s := range steps {
			out = append(out, planStepJSON{s.VM, s.Desc})
		}
		a.printJSON(out)
		return nil
	}
	for i, s := range steps {
		fmt.Fprintf(a.out, "%2d. [%s] %s\n", i+1, s.VM, s.Desc)
	}
	return nil
}
