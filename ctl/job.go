package ctl

import (
	"fmt"
	"strings"
	"time"

	"github.com/qcrypt/qcrypt/dbusapi"
)

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
		a.printJSON(jobJSON{res.Success, res.Message})
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
