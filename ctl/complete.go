package ctl

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
)

// Shell completion: both scripts ask `qcryptctl __complete WORD...` (the words after
// qcryptctl, the last one being completed), which answers from the command table, from
// qcryptd (chain names) and from qubesd (qube names), one candidate per line. The line
// filesCandidate asks the shell to complete a file name.

const filesCandidate = "__files__"

// valueCandidates are the values an option takes, where they are a known few.
var valueCandidates = map[string][]string{"--fs": {"btrfs", "ext4"}}

// fileOptions take a dom0 path.
var fileOptions = map[string]bool{"--wd": true, "--bak": true, "--enkey": true, "--encon": true}

// complete lists the candidates for the last of words.
func (a *app) complete(words []string) []string {
	if len(words) <= 1 {
		return commandNames()
	}
	c := lookup(words[0])
	if c == nil {
		return nil
	}
	// One walk over the words before the last: options take their values along; the
	// last word is either one of those values or the next positional argument.
	last := len(words) - 1
	positional := 0
	for i := 1; i < last; i++ {
		f := flagOf(c, words[i])
		if f == nil {
			if !strings.HasPrefix(words[i], "-") {
				positional++
			}
			continue
		}
		if i+f.arity >= last { // the last word is value number last-i of f
			return a.valueCandidates(f, last-i)
		}
		i += f.arity
	}
	if strings.HasPrefix(words[last], "-") {
		var out []string
		for _, f := range c.flags {
			out = append(out, f.long)
		}
		return append(out, "--help")
	}
	switch c.name {
	case "help":
		return commandNames()
	case "completion":
		return []string{"bash", "zsh"}
	case "plan":
		if positional == 0 {
			return []string{"open", "close"}
		}
		positional--
		fallthrough
	case "open", "close", "status", "luks-init":
		if positional == 0 && c.name != "luks-init" {
			return append(a.chainNames(), a.qubeNames()...) // a chain, or an ad-hoc chain's source qube
		}
		if positional == 1 {
			return nil // the container's path inside the source qube
		}
		return a.qubeNames() // qubes; the key id (position 2) has no list
	case "cancel":
		return a.chainNames()
	case "keystore":
		if positional == 0 {
			return []string{"unlock", "lock", "status", "init"}
		}
		return nil // a directory in dom0: not this user's to list
	}
	return nil
}

// valueCandidates lists what value nth (from 1) of option f may be.
func (a *app) valueCandidates(f *flagSpec, nth int) []string {
	switch {
	case valueCandidates[f.long] != nil:
		return valueCandidates[f.long]
	case fileOptions[f.long] || f.long == "--mp" || f.long == "--inj" && nth == 2:
		return []string{filesCandidate}
	case (f.long == "--inj" || f.long == "--cy") && nth == 1:
		return a.qubeNames()
	case f.long == "--man":
		return []string{"qcryptctl", "qcrypt.ini"}
	}
	return nil
}

func commandNames() []string {
	var out []string
	for _, c := range commands {
		out = append(out, c.name)
	}
	return out
}

func flagOf(c *command, word string) *flagSpec {
	for i, f := range c.flags {
		if f.long == word || f.short != "" && f.short == word {
			return &c.flags[i]
		}
	}
	return nil
}

// chainNames asks qcryptd if it runs (a Tab key does not start it); else there are none.
func (a *app) chainNames() []string {
	api, err := a.running()
	if err != nil {
		return nil
	}
	defer api.Disconnect()
	cs, err := api.Chains(a.ctx)
	if err != nil {
		return nil
	}
	var out []string
	for _, c := range cs {
		out = append(out, c.Name)
	}
	return out
}

// qubeNames asks qubesd (dom0's users in group qubes may); dom0 itself is never a member.
func (a *app) qubeNames() []string {
	if a.qubes == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(a.ctx, 5*time.Second)
	defer cancel()
	vms, err := a.qubes(ctx)
	if err != nil {
		return nil
	}
	var out []string
	for _, vm := range vms {
		if vm.Class != qubes.ClassAdminVM {
			out = append(out, vm.Name)
		}
	}
	sort.Strings(out)
	return out
}

// completeCommand is what the completion scripts run; its words are not parsed as
// options (they are the command line being typed).
const completeCommand = "__complete"

func (a *app) printCompletions(words []string) int {
	for _, c := range a.complete(words) {
		fmt.Fprintln(a.out, c)
	}
	return ExitOK
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
