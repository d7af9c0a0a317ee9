package chains

import (
	"context"
	"fmt"
	"sort"
	"strings"

	"github.com/qcrypt/qcrypt/qubes"
)

// Discovered is a chain found open on the system, configured here or not.
type Discovered struct {
	SourceVM   string          `json:"source_vm"`
	SourcePort string          `json:"source_port"`
	File       string          `json:"file,omitempty"` // the loop's backing file as the source reports it; empty if not a clean path
	Key        string          `json:"key,omitempty"`  // mapper name = key id; empty if unknown
	ReadOnly   bool            `json:"read_only"`
	Hops       []DiscoveredHop `json:"hops"`
}

// DiscoveredHop is one destination: the device it got and, except for the last, the dm
// device it passes on.
type DiscoveredHop struct {
	VM          string `json:"vm"`
	FrontendDev string `json:"frontend_dev"`
	Port        string `json:"port,omitempty"`
}

// String renders the original's one-line form: src:loop0 --> vm2:dm-1 --> vm3:xvdi (r/o).
func (d Discovered) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s:%s", d.SourceVM, d.SourcePort)
	for _, h := range d.Hops {
		if h.Port != "" {
			fmt.Fprintf(&b, " --> %s:%s", h.VM, h.Port)
		} else {
			fmt.Fprintf(&b, " --> %s:%s", h.VM, h.FrontendDev)
		}
	}
	if d.ReadOnly {
		b.WriteString(" (r/o)")
	} else {
		b.WriteString(" (r/w)")
	}
	return b.String()
}

// Shape names the qubes in chain order: "sys-usb > mediator > work".
func (d Discovered) Shape() string {
	vms := []string{d.SourceVM}
	for _, h := range d.Hops {
		vms = append(vms, h.VM)
	}
	return strings.Join(vms, " > ")
}

// Matches reports whether a discovered chain is a configured one.
func (d Discovered) Matches(c *Chain) bool {
	return len(d.Hops) == len(c.Hops) && d.partOf(c)
}

// partOf reports whether a discovered chain is c or its beginning (c partly open).
func (d Discovered) partOf(c *Chain) bool {
	if d.SourceVM != c.SourceVM || len(d.Hops) > len(c.Hops) || d.Key != "" && d.Key != c.Key {
		return false
	}
	for i, h := range d.Hops {
		if h.VM != c.Hops[i].VM {
			return false
		}
	}
	return d.File == "" || d.File == c.Container()
}

// Discover finds every chain open on the system from qubesd's attachment data: a
// non-dm device attached somewhere starts a chain; a dm device of that qube, described
// with the same mapper name, attached further continues it. Descriptions come from
// the qubes and only select candidates: the qube is asked, in one call, which of them
// sits on the device it got, and only its exit code comes back.
func (e *Engine) Discover(ctx context.Context) ([]Discovered, error) {
	vms, err := e.Qubes.ListVMs(ctx)
	if err != nil {
		return nil, fmt.Errorf("cannot list qubes: %w", err)
	}
	states, admin := map[string]string{}, map[string]bool{}
	var running []string
	for _, vm := range vms {
		states[vm.Name], admin[vm.Name] = vm.State, vm.Class == qubes.ClassAdminVM
		// Nothing attached to dom0 is a chain, and dom0 is not asked anything.
		if vm.State == qubes.StateRunning && vm.Class != qubes.ClassAdminVM {
			running = append(running, vm.Name)
		}
	}
	sort.Strings(running)
	var all []qubes.Attachment
	for _, vm := range running {
		atts, err := e.Qubes.Attached(ctx, vm)
		if err != nil {
			return nil, fmt.Errorf("cannot list devices of %s: %w", vm, err)
		}
		all = append(all, atts...)
	}
	avail := map[string][]qubes.BlockDevice{}
	describe := func(dev qubes.DeviceRef) string {
		if _, ok := avail[dev.Backend]; !ok {
			avail[dev.Backend], _ = e.Qubes.Available(ctx, dev.Backend)
		}
		for _, d := range avail[dev.Backend] {
			if d.Port == dev.Port {
				return d.Description
			}
		}
		return ""
	}
	var out []Discovered
	for _, start := range all {
		if dmPortRE.MatchString(start.Port) || states[start.Backend] != qubes.StateRunning || admin[start.Backend] {
			continue
		}
		d := Discovered{SourceVM: start.Backend, SourcePort: start.Port, ReadOnly: start.ReadOnly,
			Hops: []DiscoveredHop{{VM: start.Frontend, FrontendDev: start.FrontendDev}}}
		if f := describe(start.DeviceRef); validatePath(f, true) == nil && qubes.Printable(f, 4096) == f {
			d.File = f
		}
		for cur, curDev := start.Frontend, start.FrontendDev; len(d.Hops) <= len(running); {
			var next []qubes.Attachment
			for _, a := range all {
				if a.Backend != cur || !dmPortRE.MatchString(a.Port) {
					continue
				}
				name := normDesc(describe(a.DeviceRef))
				if ValidateKeyID(name) != nil || d.Key != "" && name != d.Key {
					continue
				}
				next = append(next, a)
			}
			// Descriptions only select candidates: the qube must say that the mapper
			// sits on the device this chain gave it, even when there is one candidate.
			if len(next) > 0 {
				next = e.onDevice(ctx, cur, curDev, next, describe)
			}
			if len(next) != 1 {
				break
			}
			n := next[0]
			d.Key = normDesc(describe(n.DeviceRef))
			d.Hops[len(d.Hops)-1].Port = n.Port
			d.Hops = append(d.Hops, DiscoveredHop{VM: n.Frontend, FrontendDev: n.FrontendDev})
			cur, curDev = n.Frontend, n.FrontendDev
		}
		out = append(out, d)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out, nil
}

// onDevice keeps the candidates whose mapper in vm sits on /dev/dev; the qube answers
// with the index of the matching candidate as its exit code.
func (e *Engine) onDevice(ctx context.Context, vm, dev string, cands []qubes.Attachment, describe func(qubes.DeviceRef) string) []qubes.Attachment {
	if dev == "" || len(cands) > 60 {
		return nil
	}
	var b strings.Builder
	for i, a := range cands {
		fmt.Fprintf(&b, "d=$(cryptsetup status %s 2>/dev/null | awk '$1 == \"device:\" {print $2}')\n", q(normDesc(describe(a.DeviceRef))))
		fmt.Fprintf(&b, "[ \"$d\" = %s ] && exit %d\n", q("/dev/"+dev), statusBase+i)
	}
	fmt.Fprintf(&b, "exit 0")
	res, err := e.run(ctx, vm, b.String(), nil)
	if err != nil {
		return nil
	}
	i := res.ExitCode - statusBase
	if i < 0 || i >= len(cands) {
		return nil
	}
	return []qubes.Attachment{cands[i]}
}
