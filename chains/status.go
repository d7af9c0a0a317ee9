package chains

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"

	"github.com/qcrypt/qcrypt/qubes"
)

// Source states.
const (
	SourceUnknown = "unknown" // qube down
	SourceMissing = "missing" // no container file (or source device not mounted)
	SourceFile    = "file"    // file, no loop device
	SourceLoop    = "loop"    // loop device set up
)

// Status is a chain's facts, hop by hop, as qubesd and exit codes of the qubes say.
type Status struct {
	Chain         string      `json:"chain"`
	SourceVM      string      `json:"source_vm"`
	SourceRunning bool        `json:"source_running"`
	Source        string      `json:"source"`
	Hops          []HopStatus `json:"hops"`
	// Missing is the original's exit code: the number of steps missing towards
	// decryption (and mounting) in the target; 0 = open.
	Missing int `json:"missing"`
	// Problem is set when the facts do not fit a chain qcrypt made (decrypted without a
	// key, ...); such a chain is never "open".
	Problem string `json:"problem,omitempty"`
	// Other is set when what is open is another chain than this one (its mapper sits on
	// a device from elsewhere, or its device carries another mapper): closing this one
	// would close or detach that one's parts.
	Other string `json:"other,omitempty"`
}

// HopStatus is one destination qube.
type HopStatus struct {
	VM          string `json:"vm"`
	Running     bool   `json:"running"`
	Attached    bool   `json:"attached"`
	FrontendDev string `json:"frontend_dev,omitempty"`
	KeyPresent  bool   `json:"key_present"`
	// Decrypted: a mapper named as the key id sits on the device from the previous hop;
	// one elsewhere does not count (see Status.Other).
	Decrypted bool `json:"decrypted"`
	Mounted   bool `json:"mounted"`
	// MapperElsewhere: a mapper of that name exists but sits on another device.
	MapperElsewhere bool `json:"mapper_elsewhere,omitempty"`
}

// Open reports a complete, healthy chain.
func (s *Status) Open() bool { return s.Missing == 0 && s.Problem == "" && s.Other == "" }

// Closed reports that nothing of the chain exists: no loop device, nothing attached,
// decrypted or mounted.
func (s *Status) Closed() bool {
	if s.Source == SourceLoop {
		return false
	}
	for _, h := range s.Hops {
		if h.Attached || h.Decrypted || h.Mounted || h.MapperElsewhere {
			return false
		}
	}
	return true
}

var (
	loopPortRE = regexp.MustCompile(`^loop[0-9]+$`)
	dmPortRE   = regexp.MustCompile(`^dm-[0-9]+$`)
)

// hopAttachments returns what hop i has attached from the previous qube of the chain
// (a loop device from the source, a dm device from an intermediate).
func hopAttachments(atts []qubes.Attachment, prev string, first bool) []qubes.Attachment {
	var out []qubes.Attachment
	for _, a := range atts {
		if a.Backend != prev {
			continue
		}
		if first && loopPortRE.MatchString(a.Port) || !first && dmPortRE.MatchString(a.Port) {
			out = append(out, a)
		}
	}
	return out
}

// Status inspects a chain with one Admin API list, one Attached per running
// destination and one script per running qube; only exit codes come back from qubes.
func (e *Engine) Status(ctx context.Context, c *Chain) (*Status, error) {
	st, _, err := e.status(ctx, c)
	return st, err
}

// status is Status that also returns the qubes' power states it listed. A qube that
// stops while it is read (qrexec cannot reach it any more) is a change of the world, not
// a failure: the status is read again with the new power states.
func (e *Engine) status(ctx context.Context, c *Chain) (*Status, map[string]string, error) {
	for attempt := 1; ; attempt++ {
		st, states, err := e.statusOnce(ctx, c)
		var te *qubes.TransportError
		if err == nil || !errors.As(err, &te) || attempt == 3 {
			return st, states, err
		}
		now, lerr := e.memberStates(ctx, c)
		if lerr != nil || now[te.VM] == qubes.StateRunning {
			return st, states, err
		}
	}
}

func (e *Engine) statusOnce(ctx context.Context, c *Chain) (*Status, map[string]string, error) {
	states, err := e.memberStates(ctx, c)
	if err != nil {
		return nil, nil, err
	}
	st := &Status{Chain: c.Name, SourceVM: c.SourceVM, Source: SourceUnknown}
	st.SourceRunning = states[c.SourceVM] == qubes.StateRunning
	if st.SourceRunning {
		res, err := e.run(ctx, c.SourceVM, sourceStatusScript(c), nil)
		if err != nil {
			return nil, nil, err
		}
		switch res.ExitCode {
		case srcLoop:
			st.Source = SourceLoop
		case srcNoLoop:
			st.Source, st.Missing = SourceFile, st.Missing+1
		case srcMissing:
			st.Source, st.Missing = SourceMissing, st.Missing+2
		default:
			return nil, nil, fmt.Errorf("cannot get the status of %s in %s: %s", c.Name, c.SourceVM, scriptError(res.ExitCode))
		}
	} else {
		st.Missing += 3
	}
	prev := c.SourceVM
	for i, h := range c.Hops {
		hs := HopStatus{VM: h.VM, Running: states[h.VM] == qubes.StateRunning}
		last := i == len(c.Hops)-1
		if !hs.Running {
			st.Missing += 4
			if last && c.MountPoint != "" {
				st.Missing++
			}
			st.Hops = append(st.Hops, hs)
			prev = h.VM
			continue
		}
		atts, err := e.Qubes.Attached(ctx, h.VM)
		if err != nil {
			return nil, nil, fmt.Errorf("cannot list devices of %s: %w", h.VM, err)
		}
		mine, err := e.ownAttachments(ctx, c, i, hopAttachments(atts, prev, i == 0), "")
		if err != nil {
			return nil, nil, fmt.Errorf("cannot list devices of %s: %w", prev, err)
		}
		// devs: from the previous hop and the chain's own; others: provably another
		// chain's (another backend, another kind, or a description that is not ours).
		// A device from the previous hop while it is down cannot be told: neither.
		var devs, others []string
		cands := hopAttachments(atts, prev, i == 0)
		same := func(list []qubes.Attachment, a qubes.Attachment) bool {
			return slices.ContainsFunc(list, func(m qubes.Attachment) bool { return m.FrontendDev == a.FrontendDev })
		}
		for _, a := range atts {
			switch {
			case a.FrontendDev == "":
			case same(mine, a):
				devs = append(devs, "/dev/"+a.FrontendDev)
			case same(cands, a) && states[prev] != qubes.StateRunning:
			default:
				others = append(others, "/dev/"+a.FrontendDev)
			}
		}
		hs.Attached = len(mine) > 0
		if hs.Attached && len(mine) == 1 {
			hs.FrontendDev = mine[0].FrontendDev
		}
		user, err := e.user(ctx, h.VM)
		if err != nil {
			return nil, nil, err
		}
		mp := ""
		if last {
			mp = c.MountPoint
		}
		res, err := e.run(ctx, h.VM, hopStatusScript(keyPath(user, c.Key), c.Key, devs, others, mp), nil)
		if err != nil {
			return nil, nil, err
		}
		bits := res.ExitCode - statusBase
		if bits < 0 || bits >= 64 {
			return nil, nil, fmt.Errorf("cannot get the status of %s in %s: %s", c.Name, h.VM, scriptError(res.ExitCode))
		}
		pos, use := bits>>posShift&3, bits>>useShift&3
		hs.KeyPresent = bits&bitKey != 0
		hs.Decrypted = pos == posHop
		hs.MapperElsewhere = pos == posOther || pos == posLoose
		hs.Mounted = use == useMounted || use == useMountedAt
		if !hs.Attached {
			st.Missing++
		}
		switch {
		case pos == posOther:
			st.Other = fmt.Sprintf("%s has %s open on a device from another qube than %s: another chain is open there", h.VM, c.Key, prev)
		case bits&bitHopBusy != 0:
			st.Other = fmt.Sprintf("the device %s has from %s carries another mapper than %s: another chain is open there", h.VM, prev, c.Key)
		case last && hs.Decrypted && use == usePassedOn:
			st.Other = fmt.Sprintf("%s passes %s on: this is the first part of a longer chain", h.VM, c.Key)
			st.Missing++ // as the original: the plaintext is not here
		}
		switch {
		case pos != posNone && !hs.KeyPresent:
			st.Problem = fmt.Sprintf("%s has %s open without its key: not managed by qcrypt?", h.VM, c.Key)
		case pos == posLoose && hs.Attached:
			st.Problem = fmt.Sprintf("%s has %s open on a device that is not the chain's previous hop", h.VM, c.Key)
		}
		switch {
		case hs.Decrypted:
		case hs.KeyPresent:
			st.Missing++
		default:
			st.Missing += 2
		}
		if last && (c.MountPoint != "" && use != useMountedAt || c.MountAnywhere && !hs.Mounted) {
			st.Missing++
		}
		st.Hops = append(st.Hops, hs)
		prev = h.VM
	}
	return st, states, nil
}
