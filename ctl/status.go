package ctl

import (
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/qcrypt/qcrypt/chains"
)

func cmdStatus(a *app, p *parsed) error {
	api, err := a.client()
	if err != nil {
		return err
	}
	var st *chains.Status
	switch len(p.args) {
	case 0:
		return a.overview(api, p.flags["--json"])
	case 1:
		st, err = api.Status(a.ctx, p.args[0])
	default:
		spec, serr := p.spec()
		if serr != nil {
			return usageErr(serr.Error())
		}
		st, err = api.StatusAdhoc(a.ctx, spec)
	}
	if err != nil {
		return &exitError{code: ExitStatusError, err: err} // unless not running or denied
	}
	if p.flags["--json"] {
		a.printJSON(st)
	} else {
		a.printStatus(st)
	}
	if st.Problem != "" {
		return exitCode(ExitStatusError)
	}
	return exitCode(min(st.Missing, ExitStatusError-1))
}

func yesno(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func (a *app) printStatus(st *chains.Status) {
	state := "open"
	switch {
	case st.Problem != "":
		state = "strange: " + st.Problem
	case st.Other != "":
		state = "not this chain: " + st.Other
	case st.Closed():
		state = "closed"
	case !st.Open():
		state = "partially open"
	}
	fmt.Fprintf(a.out, "%s: %s (%d steps missing)\n", st.Chain, state, st.Missing)
	tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  QUBE\tRUNNING\tATTACHED\tKEY\tDECRYPTED\tMOUNTED")
	src := map[string]string{chains.SourceLoop: "source: loop device set up", chains.SourceFile: "source: file, no loop device",
		chains.SourceMissing: "source: container missing", chains.SourceUnknown: "source: unknown"}[st.Source]
	fmt.Fprintf(tw, "  %s\t%s\t%s\t\t\t\n", st.SourceVM, yesno(st.SourceRunning), src)
	for _, h := range st.Hops {
		if !h.Running {
			fmt.Fprintf(tw, "  %s\tno\t-\t-\t-\t-\n", h.VM)
			continue
		}
		att := yesno(h.Attached)
		if h.FrontendDev != "" {
			att += " (" + h.FrontendDev + ")"
		}
		dec := yesno(h.Decrypted)
		if h.Decrypted && len(h.Segments) > 0 {
			var segs []string
			for _, s := range h.Segments {
				segs = append(segs, s.String())
			}
			dec += " (" + strings.Join(segs, "; ") + ")"
		}
		fmt.Fprintf(tw, "  %s\tyes\t%s\t%s\t%s\t%s\n", h.VM, att, yesno(h.KeyPresent), dec, yesno(h.Mounted))
	}
	tw.Flush()
}

// shellWords quotes a command line that came partly from qubes, for copying.
func shellWords(words []string) string {
	out := make([]string, len(words))
	for i, w := range words {
		out[i] = chains.ShellWord(w)
	}
	return strings.Join(out, " ")
}

func (a *app) overview(api API, asJSON bool) error {
	cs, err := api.Chains(a.ctx)
	if err != nil {
		return err
	}
	found, err := api.Discover(a.ctx)
	if err != nil {
		return err
	}
	var unmanaged []discoveredJSON
	for _, d := range found {
		if d.ManagedBy == "" {
			unmanaged = append(unmanaged, discoveredToJSON(d))
		}
	}
	if asJSON {
		out := statusJSON{[]chainJSON{}, []discoveredJSON{}}
		for _, c := range cs {
			out.Chains = append(out.Chains, toJSON(c))
		}
		out.Unmanaged = append(out.Unmanaged, unmanaged...)
		a.printJSON(out)
		return nil
	}
	a.chainTable(cs)
	if len(unmanaged) > 0 {
		fmt.Fprintln(a.out, "\nOpen chains qcryptd does not manage:")
		for _, u := range unmanaged {
			fmt.Fprintf(a.out, "  %s\n    %s\n", u.Line, u.Command)
		}
	}
	return nil
}
