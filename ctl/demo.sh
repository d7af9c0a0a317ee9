#!/usr/bin/env bash
# make demo: qcrypt's main job on the embedded Qubes simulator, step by step, with the
# real binaries: a private system bus, qubes-sim (the demo world), qcryptd, qcryptctl.
set -euo pipefail
BIN=$(cd "${BIN:-bin}" && pwd)
work=$(mktemp -d /tmp/qcrypt-demo.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  status=$?
  if [ "$status" != 0 ]; then
    # What went wrong is in the logs of the pieces, not in the step that saw it.
    for log in sim.log qcryptd.log; do
      [ -s "$work/$log" ] && { echo "--- $log (last lines):"; tail -n 20 "$work/$log"; } >&2
    done
  fi
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[i]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

if [ -t 1 ]; then B=$'\033[1m'; N=$'\033[0m'; else B=; N=; fi
step() { printf '\n%s== %s%s\n' "$B" "$*" "$N"; }
run() { printf '$ %s\n' "$*"; "$@"; }
inqube() { # inqube VM SCRIPT: run a script as root in a simulated qube
  printf '$ [in %s] %s\n' "$1" "$2"
  printf '%s\n' "$2" | "$BIN/qubes-sim" qrexec-client --socket "$work/qubesd.sock" -d "$1" 'root:QUBESRPC qubes.VMShell+ dom0'
}
until_state() { # until_state CHAIN STATE
  for _ in $(seq 200); do
    "$BIN/qcryptctl" list --json | grep -A1 "\"name\": \"$1\"" | grep -q "\"state\": \"$2\"" && return 0
    sleep 0.1
  done
  echo "timed out waiting for $1 to be $2" >&2; return 1
}
export PATH="$BIN:$PATH"

step "Start a private system bus, the Qubes simulator (demo world) and qcryptd"
cat > "$work/bus.conf" <<CONF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path=$work/bus.sock</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/></policy></busconfig>
CONF
dbus-daemon --config-file="$work/bus.conf" --nofork >/dev/null 2>&1 & pids+=($!)
export DBUS_SYSTEM_BUS_ADDRESS="unix:path=$work/bus.sock"
qubes-sim serve --socket "$work/qubesd.sock" --state "$work/sim" --demo 2>"$work/sim.log" & pids+=($!)
mkdir -p "$work/conf/demo"
qubes-sim demo-chain > "$work/conf/demo/demo.ini"
cat "$work/conf/demo/demo.ini"
for _ in $(seq 100); do [ -S "$work/qubesd.sock" ] && [ -S "$work/bus.sock" ] && break; sleep 0.05; done
[ -S "$work/qubesd.sock" ] || { echo "the simulator did not start" >&2; exit 1; }
qcryptd --config-root "$work/conf" --target demo --qubesd-socket "$work/qubesd.sock" \
  --qrexec-client "$BIN/qubes-sim qrexec-client --socket $work/qubesd.sock" \
  --state-dir "$work/state" --dom0-root "$work/sim/qubes/dom0" 2>"$work/qcryptd.log" & pids+=($!)
for _ in $(seq 200); do qcryptctl list >/dev/null 2>&1 && break; sleep 0.05; done
qcryptctl list >/dev/null || { echo "qcryptd did not come up" >&2; exit 1; }
run qubes-sim ctl --socket "$work/qubesd.sock" list

step "The chain is configured; work is not running, so qcryptd waits for it"
until_state demo waiting
run qcryptctl status
rc=0; run qcryptctl status demo || rc=$?; echo "(exit status $rc = steps missing)"

step "Start work: qcryptd sees the event and opens the chain by itself"
qcryptctl watch 2>/dev/null & pids+=($!)
sleep 0.2
run qubes-sim ctl --socket "$work/qubesd.sock" start work
until_state demo open
run qcryptctl status demo

step "Write a file into the plaintext in work"
inqube work 'echo "hello from work" > /mnt/demo/hello.txt && ls -l /mnt/demo'
printf '$ grep -c "hello from work" sys-usb:/home/user/demo.luks   # the container holds only ciphertext\n'
grep -c "hello from work" "$work/sim/qubes/sys-usb/home/user/demo.luks" || true

step "Close the chain, then open it again: the file is still there"
run qcryptctl close demo
run qcryptctl open demo
inqube work 'cat /mnt/demo/hello.txt'

step "Create a second container with luks-init (keys go to mediator and work), open it ad hoc"
run qcryptctl luks-init --size 48M --fs ext4 sys-usb /home/user/vault.luks vault mediator work
run qcryptctl open --mp /mnt/vault sys-usb /home/user/vault.luks vault mediator work
inqube work 'echo secret > /mnt/vault/note && df -h /mnt/vault >/dev/null && ls /mnt/vault'
run qcryptctl list
run qcryptctl plan close demo

step "Close everything and stop qcryptd"
run qcryptctl close-all --stop
sleep 0.3
echo "qcryptd's log (last lines):"; sed 's/^/  /' "$work/qcryptd.log" | tail -n 5
echo; echo "Demo done."
