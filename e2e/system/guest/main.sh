#!/bin/bash
# main.sh: the installed-stack test's guest side (e2e/system, make system-test). It runs
# as root in a qemu guest whose PID 1 is the real systemd and whose system bus is
# dbus-broker (../shared/real-systemd). It sets up the Qubes world where the shipped
# unit looks for it (the simulator's Admin API at qcryptd's default socket, its
# qrexec-client at the default path: no flags), then runs scenarios/*.sh in order, one
# scenario each, printing TAP lines and each scenario's time. SCENARIOS (e.g. "00 02")
# runs a subset. The guest powers off when this ends; the last scenario arms a capture
# of that shutdown, which the host test reads (work/shutdown.json).
set -u
cd "$(dirname "$0")"
. ./lib.sh

started=$(date +%s.%N)
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# --- the world (test equipment, not part of the product)
modprobe -a loop dm_crypt || true
install -D -m 0755 ./qubes-sim "$SIM"
install -D -m 0755 units/shutdown-all.sh /usr/lib/qubes-sim/shutdown-all.sh
mkdir -p /usr/lib/qubes && ln -sf "$SIM" /usr/lib/qubes/qrexec-client
install -m 0644 units/qubesd.service units/qubes-core.service /etc/systemd/system/
systemctl daemon-reload
systemctl start qubesd.service qubes-core.service
for _ in $(seq 300); do sim ping >/dev/null 2>&1 && break; sleep 0.2; done
for vm in "sys-usb DispVM" "mediator AppVM" "work AppVM"; do
  set -- $vm
  sim add-vm "$1" "$2" user >/dev/null
done
sim start sys-usb
getent group qubes >/dev/null || groupadd --system qubes
for u in quser quser2; do useradd -m -G qubes -s /bin/bash "$u"; done
useradd -m -s /bin/bash stranger
note "world ready in $(elapsed "$started") s (udev: $(systemctl is-active systemd-udevd))"

for s in scenarios/*.sh; do
  name=$(basename "$s" .sh)
  if [ -n "${SCENARIOS:-}" ] && ! printf '%s\n' $SCENARIOS | grep -qx "${name%%-*}"; then
    continue
  fi
  echo "# --- $name"
  t=$(date +%s.%N)
  . "$s"
  echo "# $name took $(elapsed "$t") s"
done
echo "# $checks checks, $failed failed, $(elapsed "$started") s in the guest"
# qcryptd's log with its fields, for the host test to show when something failed.
journalctl -u qcryptd -o json --no-pager > qcryptd.json 2>/dev/null
[ "$failed" = 0 ]
