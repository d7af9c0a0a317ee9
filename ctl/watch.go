package ctl

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/qcrypt/qcrypt/dbusapi"
)

func cmdWatch(a *app, p *parsed) error {
	api, err := a.client()
	if err != nil {
		return err
	}
	// Chain changes are for root and group qubes: others get a clear refusal, not silence.
	if _, err := api.Chains(a.ctx); err != nil {
		return err
	}
	// A presence change is a line without a chain, its text in the reason.
	line := func(ev dbusapi.ChainEvent) {
		now := a.now()
		if p.flags["--json"] {
			out, _ := json.Marshal(watchJSON{now.UTC().Format(time.RFC3339), ev.Chain, string(ev.State), string(ev.Previous), string(ev.Reason.Cause), ev.Reason.Text})
			fmt.Fprintf(a.out, "%s\n", out)
			return
		}
		if ev.Chain == "" {
			fmt.Fprintf(a.out, "%s %s\n", now.Format("15:04:05"), ev.Reason.Text)
			return
		}
		fmt.Fprintf(a.out, "%s %s: %s -> %s (%s)\n", now.Format("15:04:05"), ev.Chain, ev.Previous, ev.State, ev.Reason.Text)
	}
	err = api.Watch(a.ctx, dbusapi.Watcher{Change: line, Presence: func(running bool) {
		if running {
			line(dbusapi.ChainEvent{Reason: dbusapi.Reason{Text: "qcryptd started"}})
		} else {
			line(dbusapi.ChainEvent{Reason: dbusapi.Reason{Text: "qcryptd stopped"}})
		}
	}})
	if err != nil {
		return err
	}
	return nil
}
