package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/godbus/dbus/v5"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubes"
)

// chainJSON is the JSON form of a chain (list, status).
type chainJSON struct {
	Name       string   `json:"name"`
	State      string   `json:"state"`
	Waiting    string   `json:"waiting,omitempty"`
	Step       uint32   `json:"step,omitempty"`
	Steps      uint32   `json:"steps,omitempty"`
	LastError  string   `json:"last_error,omitempty"`
	Target     string   `json:"target"`
	Layers     []string `json:"layers"`
	MountPoint string   `json:"mount_point,omitempty"`
	Managed    bool     `json:"managed"`
	ReadOnly   bool     `json:"read_only"`
	Autostart  bool     `json:"autostart"`
	RetryAt    string   `json:"retry_at,omitempty"` // RFC 3339: the next automatic attempt
}

func toJSON(c dbusapi.ChainInfo) chainJSON {
	return chainJSON{Name: c.Name, State: string(c.State), Waiting: c.Waiting, Step: c.Step, Steps: c.Steps, LastError: c.LastError,
		Target: c.Target, Layers: c.Layers, MountPoint: c.MountPoint, Managed: c.Managed, ReadOnly: c.ReadOnly, Autostart: c.Autostart,
		RetryAt: retryAt(c)}
}

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

type discoveredJSON struct {
	Line     string   `json:"line"`
	SourceVM string   `json:"source_vm"`
	File     string   `json:"file,omitempty"`
	Key      string   `json:"key,omitempty"`
	Qubes    []string `json:"qubes"`
	ReadOnly bool     `json:"read_only"`
	Managed  string   `json:"managed_by,omitempty"`
	Command  string   `json:"status_command"`
}

func discoveredToJSON(d dbusapi.Discovered) discoveredJSON {
	var vms []string
	for _, h := range d.Hops {
		vms = append(vms, h.VM)
	}
	key, file := d.Key, d.File
	if key == "" {
		key = "UNKNOWN-KEY"
	}
	if file == "" {
		file = "UNKNOWN-FILE"
	}
	return discoveredJSON{Line: d.String(), SourceVM: d.SourceVM, File: d.File, Key: d.Key, Qubes: vms, ReadOnly: d.ReadOnly,
		Managed: d.Managed, Command: "qcryptctl status -- " + shellWords(append([]string{d.SourceVM, file, key}, vms...))}
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
		if d.Managed == "" {
			unmanaged = append(unmanaged, discoveredToJSON(d))
		}
	}
	if asJSON {
		out := struct {
			Chains    []chainJSON      `json:"chains"`
			Unmanaged []discoveredJSON `json:"unmanaged"`
		}{[]chainJSON{}, []discoveredJSON{}}
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

// job runs a job with progress on a terminal (a bar) or as plain lines.
func (a *app) job(api API, start dbusapi.Starter, asJSON bool) error {
	lastStep := -1
	var lastDraw time.Time
	progress := func(j dbusapi.JobInfo) {
		if asJSON || j.Steps == 0 || j.Step == 0 {
			return
		}
		if a.tty {
			// A bar redrawn for every byte count costs more than it shows: ~10 per second,
			// and always when the step changes.
			now := a.now()
			if int(j.Step) == lastStep && now.Sub(lastDraw) < 100*time.Millisecond {
				return
			}
			lastStep, lastDraw = int(j.Step), now
			bar := progressBar(j)
			fmt.Fprintf(a.out, "\r\033[K%s", bar)
			return
		}
		if int(j.Step) != lastStep {
			lastStep = int(j.Step)
			fmt.Fprintf(a.out, "[%d/%d] %s\n", j.Step, j.Steps, j.StepDescription)
		}
	}
	res, err := api.RunJob(a.ctx, start, progress)
	if a.tty && !asJSON {
		fmt.Fprint(a.out, "\r\033[K")
	}
	if err != nil {
		return err
	}
	if asJSON {
		a.printJSON(struct {
			Success bool   `json:"success"`
			Message string `json:"message"`
		}{res.Success, res.Message})
	} else if res.Success {
		fmt.Fprintln(a.out, res.Message)
	} else {
		fmt.Fprintln(a.err, "qcryptctl:", res.Message)
	}
	if !res.Success {
		if a.ctx.Err() != nil {
			return exitCode(ExitInterrupted) // Ctrl-C: the job was canceled and rolled back
		}
		return exitCode(ExitFailed)
	}
	return nil
}

func progressBar(j dbusapi.JobInfo) string {
	const width = 20
	frac := float64(j.Step-1) / float64(j.Steps)
	extra := ""
	if j.TotalBytes > 0 {
		frac += float64(j.Bytes) / float64(j.TotalBytes) / float64(j.Steps)
		extra = fmt.Sprintf(" %s/%s", mib(j.Bytes), mib(j.TotalBytes))
	}
	n := int(frac * width)
	n = max(0, min(width, n))
	return fmt.Sprintf("[%s%s] %d/%d %s%s", strings.Repeat("#", n), strings.Repeat(".", width-n), j.Step, j.Steps, j.StepDescription, extra)
}

func mib(b uint64) string { return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20)) }

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

func cmdLuksInit(a *app, p *parsed) error {
	spec, err := p.spec()
	if err != nil {
		return usageErr(err.Error())
	}
	if len(p.values["--inj"]) > 0 {
		return usageErr("--inj is for open: luks-init makes the keys")
	}
	switch store := p.value("--keystore"); store {
	case "":
	case "//": // the original's name for the default store
		spec.Keystore = chains.DefaultKeystoreDir
	default:
		if !strings.HasPrefix(store, "/") {
			return usageErr("--keystore needs the store's directory (an absolute path) or // for " + chains.DefaultKeystoreDir)
		}
		spec.Keystore = store
	}
	if v := p.value("--size"); v != "" {
		n, err := chains.ParseSize(v)
		if err != nil {
			return usageErr("--size: " + err.Error())
		}
		spec.Size = uint64(n)
	}
	if v := p.value("--ks"); v != "" {
		var n uint32
		if _, err := fmt.Sscan(v, &n); err != nil || n == 0 {
			return usageErr("--ks needs a number of bytes")
		}
		spec.KeySize = n
	}
	spec.FS = p.value("--fs")
	api, err := a.client()
	if err != nil {
		return err
	}
	backups, err := a.luksInitFiles(p, &spec)
	if err != nil {
		return err
	}
	if spec.Keystore == "" {
		err = a.job(api, api.LuksInit(spec), p.flags["--json"])
	} else {
		// qcryptd asks for the store's password, or a new one (asked twice here) to create it.
		var st chains.KeystoreState
		if st, err = api.KeystoreStatus(a.ctx, spec.Keystore); err == nil {
			err = a.answeredJob(api, api.LuksInit(spec), !st.Exists, p.flags["--json"])
		}
	}
	if err != nil {
		// The keys these would hold open nothing: no half-made backup stays.
		for _, b := range backups {
			os.Remove(b)
		}
	}
	return err
}

// luksInitFiles opens luks-init's dom0 files with the caller's own rights: entropy
// sources, a work file in --wd (unlinked at once, so nothing is left behind) and new
// backup files in --bak, never overwriting one. It returns the backup paths it made.
func (a *app) luksInitFiles(p *parsed, spec *dbusapi.Spec) ([]string, error) {
	var err error
	if v := p.value("--enkey"); v != "" {
		if spec.KeyEntropy, err = a.open(v, os.O_RDONLY, 0); err != nil {
			return nil, fmt.Errorf("--enkey: %w", err)
		}
	}
	if v := p.value("--encon"); v != "" {
		if spec.ContainerEntropy, err = a.open(v, os.O_RDONLY, 0); err != nil {
			return nil, fmt.Errorf("--encon: %w", err)
		}
	}
	if wd := p.value("--wd"); wd != "" {
		if err := os.MkdirAll(wd, 0o700); err != nil {
			return nil, fmt.Errorf("--wd: %w", err)
		}
		f, err := os.CreateTemp(wd, ".qcrypt-luks-init-*")
		if err != nil {
			return nil, fmt.Errorf("--wd: %w", err)
		}
		a.files = append(a.files, f)
		os.Remove(f.Name())
		spec.Container = f
	}
	var made []string
	if bak := p.value("--bak"); bak != "" {
		// The names become file names here, before qcryptd has seen them.
		if err := chains.ValidateKeyID(spec.Key); err != nil {
			return nil, err
		}
		for _, vm := range spec.Destinations {
			if err := qubes.ValidateMemberName(vm); err != nil {
				return nil, err
			}
		}
		if err := os.MkdirAll(bak, 0o700); err != nil {
			return nil, fmt.Errorf("--bak: %w", err)
		}
		spec.Backups = map[string]*os.File{}
		for _, vm := range spec.Destinations {
			path := filepath.Join(bak, vm+"_"+spec.Key)
			f, err := a.open(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
			if err != nil {
				for _, m := range made {
					os.Remove(m)
				}
				if errors.Is(err, os.ErrExist) {
					return nil, fmt.Errorf("--bak: a key backup exists already (never overwritten): %s", path)
				}
				return nil, fmt.Errorf("--bak: %w", err)
			}
			made = append(made, path)
			spec.Backups[vm] = f
		}
	}
	return made, nil
}

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
		type step struct {
			VM   string `json:"vm"`
			Step string `json:"step"`
		}
		out := []step{}
		for _, s := range steps {
			out = append(out, step{s.VM, s.Desc})
		}
		a.printJSON(out)
		return nil
	}
	for i, s := range steps {
		fmt.Fprintf(a.out, "%2d. [%s] %s\n", i+1, s.VM, s.Desc)
	}
	return nil
}

func cmdCheck(a *app, p *parsed) error {
	if len(p.args) > 1 {
		return usageErr("check takes at most one TARGET or DIR")
	}
	target := ""
	if len(p.args) == 1 {
		target = p.args[0]
	}
	var errs []string
	// A directory is read with the caller's own rights, here; qcryptd reads only its
	// config root for others than root. Without qcryptd, the same checks run here (it is
	// not started for them: it would open its chains).
	var api API
	if local := strings.Contains(target, "/") && os.Geteuid() != 0; !local {
		if c, err := a.running(); err == nil {
			api = c
		}
	}
	if api != nil {
		a.api = api
		var err error
		if _, errs, err = api.Check(a.ctx, target); err != nil {
			return err
		}
	} else {
		errs = chains.CheckTarget(target, a.configDir, os.Geteuid() == 0)
	}
	ok := len(errs) == 0
	if p.flags["--json"] {
		if errs == nil {
			errs = []string{}
		}
		a.printJSON(struct {
			OK     bool     `json:"ok"`
			Errors []string `json:"errors"`
		}{ok, errs})
	} else if ok {
		fmt.Fprintln(a.out, "All good.")
	} else {
		for _, e := range errs {
			fmt.Fprintln(a.out, "ERROR:", e)
		}
	}
	if !ok {
		return exitCode(ExitFailed)
	}
	return nil
}

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
		a.printJSON(map[string]int{"chains": n})
	} else {
		fmt.Fprintf(a.out, "Reloaded: %d chains configured.\n", n)
	}
	return nil
}

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
	type canceled struct {
		Job       uint64               `json:"job"`
		Operation dbusapi.JobOperation `json:"operation"`
		Chain     string               `json:"chain"`
	}
	var done []canceled
	for _, j := range hit {
		if err := api.CancelJob(a.ctx, dbusapi.JobPath(j.ID)); err != nil {
			return err
		}
		done = append(done, canceled{j.ID, j.Operation, j.Chain})
		if !p.flags["--json"] {
			fmt.Fprintf(a.out, "Canceled job %d (%s of %s, started by uid %d).\n", j.ID, j.Operation, j.Chain, j.UID)
		}
	}
	if p.flags["--json"] {
		a.printJSON(done)
	}
	return nil
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
	type result struct {
		Job     string `json:"job"`
		Chain   string `json:"chain"`
		Success bool   `json:"success"`
		Message string `json:"message"`
	}
	results := []result{}
	failed := false
	for i, r := range res {
		failed = failed || !r.Success
		results = append(results, result{string(paths[i]), chainOf[paths[i]], r.Success, r.Message})
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
			out, _ := json.Marshal(struct {
				Time     string `json:"time"`
				Chain    string `json:"chain"`
				State    string `json:"state"`
				Previous string `json:"previous"`
				Cause    string `json:"cause"`
				Detail   string `json:"detail"`
			}{now.UTC().Format(time.RFC3339), ev.Chain, string(ev.State), string(ev.Previous), string(ev.Reason.Cause), ev.Reason.Text})
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

func cmdHelp(a *app, p *parsed) error {
	if len(p.args) == 1 && p.args[0] == "--markdown" || p.flags["--markdown"] {
		fmt.Fprint(a.out, Markdown())
		return nil
	}
	if page := p.value("--man"); page != "" {
		out, ok := ManPages()[page]
		if !ok {
			return usageErr("--man: qcryptctl or qcrypt.ini")
		}
		fmt.Fprint(a.out, out)
		return nil
	}
	if len(p.args) == 0 {
		a.usage(a.out)
		return nil
	}
	c := lookup(p.args[0])
	if c == nil {
		return usageErr("no command " + p.args[0])
	}
	a.commandHelp(a.out, c)
	return nil
}

func cmdCompletion(a *app, p *parsed) error {
	if len(p.args) != 1 {
		return usageErr("completion needs bash or zsh")
	}
	switch p.args[0] {
	case "bash":
		fmt.Fprint(a.out, bashCompletion())
	case "zsh":
		fmt.Fprint(a.out, zshCompletion())
	default:
		return usageErr("completion needs bash or zsh")
	}
	return nil
}
