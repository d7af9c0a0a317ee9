package ctl

import (
	"fmt"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/qcrypt/qcrypt/dbusapi"
)

func retryAt(c dbusapi.ChainInfo) string {
	if c.RetryAt.IsZero() {
		return ""
	}
	return c.RetryAt.UTC().Format(time.RFC3339)
}

func info(c dbusapi.ChainInfo) string {
	switch {
	case c.State.Busy():
		return fmt.Sprintf("step %d of %d", c.Step, c.Steps)
	case !c.RetryAt.IsZero() && c.LastError != "":
		return c.LastError + "; next attempt " + c.RetryAt.Local().Format("15:04")
	case !c.RetryAt.IsZero():
		return "next attempt " + c.RetryAt.Local().Format("15:04")
	case c.Waiting != "":
		return c.Waiting
	case c.LastError != "":
		return c.LastError
	case c.State == dbusapi.ChainOpen && c.MountPoint != "":
		return "mounted on " + c.MountPoint + " in " + c.Target
	}
	return ""
}

func cmdList(a *app, p *parsed) error {
	if len(p.args) != 0 {
		return usageErr("list takes no arguments")
	}
	api, err := a.client()
	if err != nil {
		return err
	}
	cs, err := api.Chains(a.ctx)
	if err != nil {
		return err
	}
	if p.flags["--json"] {
		out := []chainJSON{}
		for _, c := range cs {
			out = append(out, toJSON(c))
		}
		a.printJSON(out)
	} else {
		a.chainTable(cs)
	}
	if !p.flags["--exit-status"] {
		return nil
	}
	bad := 0
	for _, c := range cs {
		if c.State != dbusapi.ChainOpen {
			bad++
		}
	}
	return exitCode(min(bad, ExitStatusError-1))
}

func (a *app) chainTable(cs []dbusapi.ChainInfo) {
	tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CHAIN\tSTATE\tTARGET\tLAYERS\tINFO")
	for _, c := range cs {
		name := c.Name
		if !c.Managed {
			name += " (ad-hoc)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", name, c.State, c.Target, strings.Join(c.Layers, " > "), info(c))
	}
	tw.Flush()
	if len(cs) == 0 {
		fmt.Fprintln(a.out, "(no chains)")
	}
}
