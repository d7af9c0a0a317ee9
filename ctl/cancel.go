package ctl

import (
	"fmt"
	"strconv"

	"github.com/qcrypt/qcrypt/dbusapi"
)

func cmdCancel(a *app, p *parsed) error {
	if len(p.args) != 1 {
		return usageErr("cancel needs a chain or a job number")
	}
	api, err := a.client()
	if err != nil {
		return err
	}
	jobs, err := api.Jobs(a.ctx)
	if err != nil {
		return err
	}
	var hit []dbusapi.JobInfo
	for _, j := range jobs {
		if !j.State.Ended() && (j.Chain == p.args[0] || strconv.FormatUint(j.ID, 10) == p.args[0]) {
			hit = append(hit, j)
		}
	}
	if len(hit) == 0 {
		return fmt.Errorf("cannot cancel %q: no running or queued job of that chain or number", p.args[0])
	}
	var done []canceledJSON
	for _, j := range hit {
		if err := api.CancelJob(a.ctx, dbusapi.JobPath(j.ID)); err != nil {
			return err
		}
		done = append(done, canceledJSON{j.ID, j.Operation, j.Chain})
		if !p.flags["--json"] {
			fmt.Fprintf(a.out, "Canceled job %d (%s of %s, started by uid %d).\n", j.ID, j.Operation, j.Chain, j.UID)
		}
	}
	if p.flags["--json"] {
		a.printJSON(done)
	}
	return nil
}
