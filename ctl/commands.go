// Package ctl is qcryptctl: the command-line client of qcryptd. Commands, their help,
// the generated docs page and the shell completions all come from the table below.
package ctl

// command describes one qcryptctl command.
type command struct {
	name    string
	args    string // synopsis after the name
	summary string
	help    string
	flags   []flagSpec
	run     func(a *app, p *parsed) error
}

// flagSpec is an option: arity 0 (switch), 1 or 2 (values); repeatable options collect.
type flagSpec struct {
	long, short string
	arity       int
	repeat      bool
	help        string
}

var (
	fJSON     = flagSpec{long: "--json", help: "print JSON (schema in docs/qcryptctl.md) instead of text"}
	fForce    = flagSpec{long: "--force", help: "open: close a partially open chain first; close: shut down intermediate qubes whose layer cannot be closed"}
	fSD       = flagSpec{long: "--force", short: "--sd", help: "shut down intermediate qubes whose layer cannot be closed (--sd: the original's name)"}
	fShutdown = flagSpec{long: "--shutdown-target", help: "close: also shut down the target if its layer cannot be closed"}
	fEject    = flagSpec{long: "--eject", help: "close: also unmount the source device in the source qube"}
	fAuto     = flagSpec{long: "--autostart", short: "-a", help: "start every qube of the chain (default: intermediates only)"}
	fMP       = flagSpec{long: "--mp", arity: 1, help: "mount the plaintext at this path in the target"}
	fRO       = flagSpec{long: "--ro", help: "read-only everywhere (ad-hoc chains are read-write by default, as the original)"}
	fInj      = flagSpec{long: "--inj", arity: 2, repeat: true, help: "VM KEYFILE: inject this dom0 key into VM if it has none (read with your rights); KEYFILE keystore://[DIR]: VM's key from the key store"}
	fCy       = flagSpec{long: "--cy", arity: 2, repeat: true, help: "VM OPTIONS: extra cryptsetup options for VM"}
	fCiphers  = flagSpec{long: "--ciphers", arity: 2, repeat: true, help: "VM 'CIPHER ...': the ciphers VM's layer may use (default: XTS with AES, Serpent or Twofish, and Adiantum; keys of at least 256 bits)"}
	fMountOpt = flagSpec{long: "--mount-options", arity: 1, help: "OPTION,...: mount options for the plaintext (default nosuid,nodev)"}
	fStop     = flagSpec{long: "--stop", help: "close-all: stop qcryptd afterwards"}
	fBreak    = flagSpec{long: "--break-lock", help: "open read-write although another machine's lock is beside the container (a stale lock; logged)"}
)

var adhocFlags = []flagSpec{fAuto, fMP, fRO, fInj, fCy, fCiphers, fMountOpt}

var commands []*command

func init() {
	commands = []*command{
		{name: "list", summary: "list the chains qcryptd manages", run: cmdList,
			flags: []flagSpec{fJSON, {long: "--exit-status", short: "-e", help: "exit with the number of chains that are not open (the original's qcryptd chains -e)"}},
			help:  "Lists configured and ad-hoc chains with their state, target and layers."},
		{name: "status", args: "[CHAIN | SOURCE_VM FILE KEY DST...]", summary: "show chains, or one chain hop by hop", run: cmdStatus,
			flags: []flagSpec{fJSON, {long: "--mp", arity: 1, help: "also check that the plaintext is mounted at this path (\"\": anywhere)"}},
			help: "Without arguments: every configured chain and every chain open on the system that qcryptd does not manage.\n" +
				"With a chain: its facts hop by hop; the exit status is the number of steps missing to open it (0 = open)."},
		{name: "open", args: "CHAIN | [OPTIONS] SOURCE_VM FILE KEY DST...", summary: "open a chain", run: cmdOpen,
			flags: append([]flagSpec{fJSON, fForce, fBreak}, adhocFlags...),
			help: "Opens a configured chain, or an ad-hoc one given as the original qcrypt's arguments: the container FILE in\n" +
				"SOURCE_VM, key id KEY, destination qubes in decryption order. Shows progress; Ctrl-C cancels (the open is rolled back).\n" +
				"A read-write open writes a lock FILE.qcrypt-lock beside the container and is refused while another machine's\n" +
				"lock is there (a container in a synced folder opened read-write on two machines gets destroyed); read-only\n" +
				"opens are allowed with a warning in qcryptd's log. The close removes the lock."},
		{name: "close", args: "CHAIN | [OPTIONS] SOURCE_VM FILE KEY DST...", summary: "close a chain", run: cmdClose,
			flags: []flagSpec{fJSON, fSD, fShutdown, fEject},
			help: "Closes a chain in reverse order. Never detaches from a qube that is down, never shuts the target down\n" +
				"unless --shutdown-target. Says \"not open\" (exit 0) when nothing of the chain is open, and fails, changing\n" +
				"nothing, when its container is open as another chain: it names that chain, to be closed as it was opened."},
		{name: "luks-init", args: "[OPTIONS] SOURCE_VM FILE KEY DST...", summary: "create a new container and its keys", run: cmdLuksInit,
			flags: []flagSpec{fJSON, fAuto, fCy,
				{long: "--size", arity: 1, help: "container size, e.g. 1G (default 1G)"},
				{long: "--wd", arity: 1, help: "build the container in this dom0 directory, made if missing (default: qcryptd's /run)"},
				{long: "--ks", arity: 1, help: "key size in bytes (default 100)"},
				{long: "--bak", arity: 1, help: "keep key backups <VM>_<KEY> in this dom0 directory (made if missing; files 0600, never overwritten)"},
				{long: "--keystore", arity: 1, help: "DIR: also keep every key in this blib key store (// = /etc/blib/keys), creating it if there is none; qcryptd asks for its password"},
				{long: "--fs", arity: 1, help: "btrfs (default, zstd compression) or ext4"},
				{long: "--enkey", arity: 1, help: "entropy for keys (default /dev/random)"},
				{long: "--encon", arity: 1, help: "entropy for the container (default /dev/urandom)"}},
			help: "Builds the container in dom0 (one LUKS2 layer per destination, the outermost for the first), copies the keys\n" +
				"into the destinations and the container into SOURCE_VM. Never overwrites a file or a key. The files named by\n" +
				"--wd, --bak, --enkey and --encon are opened by qcryptctl with your rights and passed to qcryptd as descriptors."},
		{name: "plan", args: "open|close CHAIN | open|close [OPTIONS] SOURCE_VM FILE KEY DST...", summary: "print the steps an open or close would run", run: cmdPlan,
			flags: append([]flagSpec{fJSON, fForce, fShutdown, fEject}, adhocFlags...), help: "A dry run: nothing is changed."},
		{name: "check", args: "[TARGET|DIR]", summary: "validate a configuration target", run: cmdCheck, flags: []flagSpec{fJSON},
			help: "Asks qcryptd, or checks locally when it is not running. A DIR is checked locally with your rights unless\n" +
				"you are root. Prints \"All good.\" or every error."},
		{name: "reload", summary: "make qcryptd re-read its configuration", run: cmdReload, flags: []flagSpec{fJSON},
			help: "Unchanged open chains are left alone; removed ones are closed."},
		{name: "cancel", args: "CHAIN | JOB", summary: "cancel the running or queued jobs of a chain, or one job", run: cmdCancel, flags: []flagSpec{fJSON},
			help: "Also jobs qcryptd started itself, e.g. an automatic open that hangs in a qube. A job stops at once (a qrexec\n" +
				"call in progress is ended; a device attach qubesd is doing is waited for, since qubesd finishes it anyway) and\n" +
				"what it did is rolled back; the chain then stays closed until the next trigger."},
		{name: "keystore", args: "unlock|lock|status|init [DIR]", summary: "unlock, lock, show or create a blib key store", run: cmdKeystore, flags: []flagSpec{fJSON},
			help: "The original's key store (DIR, default /etc/blib/keys), from which chain files inject keys\n" +
				"(destination inj N=keystore://[DIR]). unlock: qcryptd asks for the store's password through systemd's password\n" +
				"agents and this command answers its own question on the terminal (or reads a line from standard input);\n" +
				"chains waiting for the store open. The store stays unlocked until lock or the next boot. A store the original\n" +
				"opened is used without a password. lock: unmount and close it; open chains stay open. init: create a store\n" +
				"as the original does (20 MiB, LUKS, ext4; the new password asked twice) and leave it unlocked."},
		{name: "close-all", summary: "close every open chain", run: cmdCloseAll, flags: []flagSpec{fJSON, fSD, fShutdown, fStop}},
		{name: "watch", summary: "follow chain state changes", run: cmdWatch, flags: []flagSpec{fJSON}, help: "Prints one line per change until interrupted."},
		{name: "notify-agent", summary: "post desktop notifications for chain events (run in the desktop session)", run: cmdNotifyAgent,
			help: "Listens to qcryptd on the system bus and notifies through org.freedesktop.Notifications on the session bus:\n" +
				"a chain opened (and where), closed, failed (critical) or its device appeared. One notification per chain.\n" +
				"Started by its XDG autostart entry; one runs per session (a second leaves); it waits for qcryptd and follows\n" +
				"it across restarts. Failed notifications are told on stderr."},
		{name: "completion", args: "bash|zsh", summary: "print a shell completion script", run: cmdCompletion},
		{name: "help", args: "[COMMAND]", summary: "show help", run: cmdHelp,
			flags: []flagSpec{{long: "--markdown", help: "print docs/qcryptctl.md"},
				{long: "--man", arity: 1, help: "print the man page qcryptctl(1) or qcrypt.ini(5) (docs/man/)"}}},
	}
}

func lookup(name string) *command {
	for _, c := range commands {
		if c.name == name {
			return c
		}
	}
	return nil
}
