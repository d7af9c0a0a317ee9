package chains

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sync"

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
	// Segments are what the kernel runs for a mapper of that name (dmsetup table):
	// for an open layer, its cipher and key size.
	Segments []Segment `json:"segments,omitempty"`
}

// Open reports a complete, healthy chain.
func (s *Status) Open() bool { return s.Missing == 0 && s.Problem == "" && s.Other == "" }

// Closed reports that nothing of the chain exists: no loop device, nothing attached,
// decrypted or mounted.
func (s *Status) Closed() bool { return s.Source != SourceLoop && !s.held() }

// held reports whether any destination holds something of the chain: an attached
// device, its mapper (wherever it sits) or the mount.
func (s *Status) held() bool {
	for _, h := range s.Hops {
		if h.Attached || h.Decrypted || h.Mounted || h.MapperElsewhere {
			return true
		}
	}
	return false
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

// Status inspects a chain: its facts come from qubesd and, from the qubes, exit codes
// only. Concurrent calls are read together (see statusAll).
func (e *Engine) Status(ctx context.Context, c *Chain) (*Status, error) {
	st, _, err := e.status(ctx, c)
	return st, err
}

// statusResult is one chain's status, with the qubes' power states it was read with.
type statusResult struct {
	st     *Status
	states map[string]string // shared by a batch: read only
	err    error
}

// status is Status that also returns the qubes' power states it listed. A call that
// comes while a batch is being read joins the next one, so fifty chains reconciled at
// start-up cost one qube listing and one script per running qube, not fifty of each.
func (e *Engine) status(ctx context.Context, c *Chain) (*Status, map[string]string, error) {
	e.mu.Lock()
	if e.statuses == nil {
		e.statuses = qubes.NewBatcher(e.statusAll)
	}
	b := e.statuses
	e.mu.Unlock()
	r, err := b.Do(ctx, c)
	if err != nil {
		return nil, nil, fmt.Errorf("cannot get the status of %s: %w", c.Name, err)
	}
	return r.st, r.states, r.err
}

// statusAll reads the chains' statuses together. A qube that stops while it is read
// (qrexec cannot reach it any more) is a change of the world, not a failure: the
// statuses are read again with the new power states.
func (e *Engine) statusAll(ctx context.Context, cs []*Chain) map[*Chain]statusResult {
	for attempt := 1; ; attempt++ {
		res, unreachable := e.readStatuses(ctx, cs)
		if len(unreachable) == 0 || attempt == 3 {
			return res
		}
		now, err := e.states(ctx)
		if err != nil || !slices.ContainsFunc(unreachable, func(vm string) bool { return now[vm] != qubes.StateRunning }) {
			return res
		}
	}
}

// statusPiece is one chain's question to one qube: its source (hop -1) or hop.
type statusPiece struct {
	chain, hop int
	script     string
	mine       []qubes.Attachment // a hop's attachments that are the chain's
}

// readStatuses reads once: one qube listing, one attachment listing per running
// destination, one device listing per backend asked about, and one script per running
// qube with the questions of every chain it is part of. It returns the qubes that
// qrexec could not reach.
func (e *Engine) readStatuses(ctx context.Context, cs []*Chain) (map[*Chain]statusResult, []string) {
	out := map[*Chain]statusResult{}
	fail := func(err error) map[*Chain]statusResult {
		for _, c := range cs {
			out[c] = statusResult{err: err}
		}
		return out
	}
	vms, err := e.Qubes.ListVMs(ctx)
	if err != nil {
		return fail(fmt.Errorf("cannot list qubes: %w", err)), nil
	}
	states := map[string]string{}
	for _, vm := range vms {
		states[vm.Name] = vm.State
	}
	lists := &deviceLists{q: e.Qubes}
	errs := make([]error, len(cs))
	pieces := map[string][]statusPiece{} // per qube
	mappers := map[string]bool{}         // a piece in that qube needs the mapper table
	var order []string                   // qubes in the order first asked
	ask := func(vm string, p statusPiece) {
		if pieces[vm] == nil {
			order = append(order, vm)
		}
		pieces[vm] = append(pieces[vm], p)
	}
	for ci, c := range cs {
		if err := adminMember(c, vms); err != nil {
			errs[ci] = err
			continue
		}
		if states[c.SourceVM] == qubes.StateRunning {
			ask(c.SourceVM, statusPiece{chain: ci, hop: -1, script: sourceStatusScript(c)})
		}
		prev := c.SourceVM
		for i, h := range c.Hops {
			if states[h.VM] != qubes.StateRunning {
				prev = h.VM
				continue
			}
			script, err := e.hopQuestion(ctx, lists, c, i, prev, states)
			if err != nil {
				errs[ci] = err
				break
			}
			ask(h.VM, statusPiece{chain: ci, hop: i, script: script.text, mine: script.mine})
			mappers[h.VM] = mappers[h.VM] || script.mappers
			prev = h.VM
		}
	}

	// One script per qube, all qubes at once (the runner bounds how many run).
	codes := map[string][]pieceAnswer{}
	qubeErr := map[string]error{}
	var unreachable []string
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, vm := range order {
		var attached []string
		if mappers[vm] || slices.ContainsFunc(pieces[vm], func(p statusPiece) bool { return p.hop >= 0 }) {
			atts, err := lists.Attached(ctx, vm)
			if err != nil {
				qubeErr[vm] = fmt.Errorf("cannot list devices of %s: %w", vm, err)
				continue
			}
			for _, a := range atts {
				if a.FrontendDev != "" {
					attached = append(attached, "/dev/"+a.FrontendDev)
				}
			}
		}
		var texts []string
		for _, p := range pieces[vm] {
			texts = append(texts, p.script)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := e.run(ctx, vm, statusScript(attached, mappers[vm], texts), nil)
			var got []pieceAnswer
			var te *qubes.TransportError
			switch {
			case errors.As(err, &te):
			case err != nil:
			case res.ExitCode != 0 || res.StdoutTruncated:
				err = fmt.Errorf("cannot get the status of the chains in %s: %s", vm, scriptError(res.ExitCode))
			default:
				if got, err = parseStatusAnswers(res.Stdout, len(texts)); err != nil {
					err = fmt.Errorf("cannot get the status of the chains in %s: %w", vm, err)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			if te != nil {
				unreachable = append(unreachable, vm)
			}
			codes[vm], qubeErr[vm] = got, err
		}()
	}
	wg.Wait()

	for ci, c := range cs {
		if errs[ci] == nil {
			errs[ci] = firstQubeError(c, qubeErr)
		}
		if errs[ci] != nil {
			out[c] = statusResult{err: errs[ci]}
			continue
		}
		answer := func(vm string, hop int) (pieceAnswer, []qubes.Attachment) {
			for k, p := range pieces[vm] {
				if p.chain == ci && p.hop == hop {
					return codes[vm][k], p.mine
				}
			}
			return pieceAnswer{code: -1}, nil
		}
		st, err := interpretStatus(c, states, answer)
		out[c] = statusResult{st: st, states: states, err: err}
	}
	return out, unreachable
}

// firstQubeError is the error of the first of c's qubes that could not be read.
func firstQubeError(c *Chain, qubeErr map[string]error) error {
	for _, vm := range c.VMs() {
		if err := qubeErr[vm]; err != nil {
			return err
		}
	}
	return nil
}

// hopQuestion is the status piece of hop i of c (which runs), with what dom0 knows of
// its attachments.
type hopQuestionScript struct {
	text    string
	mappers bool
	mine    []qubes.Attachment
}

func (e *Engine) hopQuestion(ctx context.Context, lists *deviceLists, c *Chain, i int, prev string, states map[string]string) (hopQuestionScript, error) {
	h := c.Hops[i]
	atts, err := lists.Attached(ctx, h.VM)
	if err != nil {
		return hopQuestionScript{}, fmt.Errorf("cannot list devices of %s: %w", h.VM, err)
	}
	cands := hopAttachments(atts, prev, i == 0)
	mine, err := ownAttachments(ctx, lists, c, i, cands, "")
	if err != nil {
		return hopQuestionScript{}, fmt.Errorf("cannot list devices of %s: %w", prev, err)
	}
	// devs: from the previous hop and the chain's own; unknown: from the previous hop
	// while it is down, which cannot be told. The rest of the qube's devices are
	// provably another chain's (another backend, another kind, or not our description).
	var devs, unknown []string
	for _, a := range cands {
		switch {
		case a.FrontendDev == "":
		case slices.ContainsFunc(mine, func(m qubes.Attachment) bool { return m.FrontendDev == a.FrontendDev }):
			devs = append(devs, "/dev/"+a.FrontendDev)
		case states[prev] != qubes.StateRunning:
			unknown = append(unknown, "/dev/"+a.FrontendDev)
		}
	}
	user, err := e.user(ctx, h.VM)
	if err != nil {
		return hopQuestionScript{}, err
	}
	mp := ""
	if i == len(c.Hops)-1 {
		mp = c.MountPoint
	}
	return hopQuestionScript{text: hopStatusScript(keyPath(user, c.Key), c.Key, devs, unknown, mp), mappers: len(devs) > 0, mine: mine}, nil
}

// interpretStatus builds c's status from the power states and what its qubes answered:
// the answer to the source's question (hop -1) or to hop i's, with the hop's own
// attachments.
func interpretStatus(c *Chain, states map[string]string, answer func(vm string, hop int) (pieceAnswer, []qubes.Attachment)) (*Status, error) {
	st := &Status{Chain: c.Name, SourceVM: c.SourceVM, Source: SourceUnknown}
	st.SourceRunning = states[c.SourceVM] == qubes.StateRunning
	if st.SourceRunning {
		switch a, _ := answer(c.SourceVM, -1); a.code {
		case srcLoop:
			st.Source = SourceLoop
		case srcNoLoop:
			st.Source, st.Missing = SourceFile, st.Missing+1
		case srcMissing:
			st.Source, st.Missing = SourceMissing, st.Missing+2
		default:
			return nil, fmt.Errorf("cannot get the status of %s in %s: %s", c.Name, c.SourceVM, scriptError(a.code))
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
		a, mine := answer(h.VM, i)
		code := a.code
		hs.Attached = len(mine) > 0
		hs.Segments = a.segments
		if len(mine) == 1 {
			hs.FrontendDev = mine[0].FrontendDev
		}
		bits := code - statusBase
		if bits < 0 || bits >= 64 {
			return nil, fmt.Errorf("cannot get the status of %s in %s: %s", c.Name, h.VM, scriptError(code))
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
	return st, nil
}
