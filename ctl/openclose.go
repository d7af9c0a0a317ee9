package ctl

import (
	"context"
	"fmt"

	"github.com/godbus/dbus/v5"
	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
)

func cmdOpen(a *app, p *parsed) error {
	o := chains.OpenOptions{Force: p.flags["--force"], Autostart: p.flags["--autostart"], BreakLock: p.flags["--break-lock"]}
	api, err := a.client()
	if err != nil {
		return err
	}
	switch len(p.args) {
	case 0:
		return usageErr("open needs a chain or SOURCE_VM FILE KEY DST...")
	case 1:
		if len(p.values) > 0 || p.flags["--ro"] {
			return usageErr("--mp, --ro, --inj, --cy, --ciphers and --mount-options are for ad-hoc chains; a configured chain has them in its file")
		}
		return a.job(api, api.Open(p.args[0], o), p.flags["--json"])
	}
	spec, err := p.spec()
	if err != nil {
		return usageErr(err.Error())
	}
	if err := a.injectFiles(p, &spec); err != nil {
		return err
	}
	// As the original asked for the store's password at the open: unlock it first.
	for _, dir := range sortedValues(spec.InjectKeystore) {
		st, err := api.KeystoreStatus(a.ctx, dir)
		if err != nil {
			return err
		}
		if !st.Unlocked {
			if err := a.answeredJob(api, api.KeystoreUnlock(dir), false, p.flags["--json"]); err != nil {
				return err
			}
		}
	}
	return a.job(api, api.OpenAdhoc(spec, o), p.flags["--json"])
}

func closeOptions(p *parsed) chains.CloseOptions {
	return chains.CloseOptions{Force: p.flags["--force"], ShutdownTarget: p.flags["--shutdown-target"], Eject: p.flags["--eject"]}
}

func cmdClose(a *app, p *parsed) error {
	api, err := a.client()
	if err != nil {
		return err
	}
	switch len(p.args) {
	case 0:
		return usageErr("close needs a chain or SOURCE_VM FILE KEY DST...")
	case 1:
		return a.job(api, api.Close(p.args[0], closeOptions(p)), p.flags["--json"])
	}
	spec, err := p.spec()
	if err != nil {
		return usageErr(err.Error())
	}
	return a.job(api, api.CloseAdhoc(spec, closeOptions(p)), p.flags["--json"])
}

func cmdCloseAll(a *app, p *parsed) error {
	api, err := a.client()
	if err != nil {
		return err
	}
	var paths []dbus.ObjectPath
	chainOf := map[dbus.ObjectPath]string{} // from each job's first report
	start := api.CloseAll(closeOptions(p), p.flags["--stop"])
	res, err := api.RunJobs(a.ctx, func(ctx context.Context) ([]dbus.ObjectPath, error) {
		var err error
		paths, err = start(ctx)
		return paths, err
	}, func(j dbusapi.JobInfo) { chainOf[dbusapi.JobPath(j.ID)] = j.Chain })
	if err != nil {
		return err
	}
	results := []closedJSON{}
	failed := false
	for i, r := range res {
		failed = failed || !r.Success
		results = append(results, closedJSON{string(paths[i]), chainOf[paths[i]], r.Success, r.Message})
	}
	if p.flags["--json"] {
		a.printJSON(results)
	} else {
		for _, r := range results {
			name := r.Chain
			if name == "" {
				name = r.Job // ended before it could be read
			}
			fmt.Fprintf(a.out, "%s: %s\n", name, r.Message)
		}
		fmt.Fprintf(a.out, "%d chains closed.\n", len(results))
	}
	if failed {
		return exitCode(ExitFailed)
	}
	return nil
}
