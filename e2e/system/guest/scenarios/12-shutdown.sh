# System shutdown: with two chains open, the guest powers off when this script ends.
# qcryptd must close both, each in order, before it exits, and before qubes-core stops
# every qube at once. A capture that stops after qcryptd, qubes-core and the simulator
# writes the journal of the shutdown into work/shutdown.json for the host test: once
# they are gone it syncs the journal and dumps it (a journalctl -f that is stopped could
# lose the last lines it had not read yet).
open_chains() { [ "$(qcryptctl list | grep -c ' open ')" = 2 ]; }
check "open a second chain, ad hoc" qcryptctl open --mp /mnt/spare sys-usb /home/user/spare.luks spare work
check "two chains open" open_chains
check "a plain stop and start keeps them open" bash -c 'systemctl stop qcryptd && systemctl start qcryptd'
eventually 60 "the new qcryptd found both open, the ad-hoc one from its journal" open_chains
printf '#!/bin/bash\njournalctl --sync\nexec journalctl -o json --no-pager --after-cursor %q > %q\n' \
  "$(cursor)" "$PWD/shutdown.json" > capture-shutdown.sh
check "the capture of the shutdown runs" systemd-run --quiet --unit=qcrypt-shutdown-capture \
  -p RequiresMountsFor="$PWD" -p Before=qcryptd.service -p Before=qubes-core.service -p Before=qubesd.service \
  -p RemainAfterExit=yes -p ExecStop="/bin/bash $PWD/capture-shutdown.sh" /bin/true
