#!/bin/sh
# qvm-shutdown --all --wait, on the simulator: every running qube at once.
sim() { /usr/lib/qubes-sim/qubes-sim ctl --socket /var/run/qubesd.sock "$@"; }
for vm in $(sim list | awk '$1 != "dom0" && $3 == "Running" { print $1 }'); do
  sim shutdown "$vm" &
done
wait
