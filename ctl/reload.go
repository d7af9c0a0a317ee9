package ctl

import "fmt"

func cmdReload(a *app, p *parsed) error {
	api, err := a.client()
	if err != nil {
		return err
	}
	n, err := api.Reload(a.ctx)
	if err != nil {
		return err
	}
	if p.flags["--json"] {
		a.printJSON(reloadJSON{n})
	} else {
		fmt.Fprintf(a.out, "Reloaded: %d chains configured.\n", n)
	}
	return nil
}
