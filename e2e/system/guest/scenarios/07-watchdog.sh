# The watchdog and crashes, with a drop-in that shortens WatchdogSec and RestartSec for
# the test only: a frozen qcryptd is killed and restarted by systemd and finds its chain
# open, and qcryptctl watch follows it; a qcryptd killed mid-open is restarted (with the
# unit as shipped again) and rolls the open back as its journal says, then opens the
# chain afresh.
as quser qcryptctl watch > /tmp/watch.out 2>&1 &
watcher=$!
mkdir -p /run/systemd/system/qcryptd.service.d
printf '[Service]\nWatchdogSec=4s\nRestartSec=1s\n' > /run/systemd/system/qcryptd.service.d/10-test-watchdog.conf
systemctl daemon-reload
check "restart with WatchdogSec=4s" systemctl restart qcryptd
eventually 60 "the chain is open" state_is vault open
started() { [ "$(grep -c 'qcryptd started' /tmp/watch.out)" -ge "$1" ]; }
eventually 60 "qcryptctl watch followed the restart" started 1
frozen=$(mainpid)
kill -STOP "$frozen"
eventually 90 "systemd killed the frozen qcryptd and started another" bash -c "[ \"\$(mainpid)\" != $frozen ] && active"
check "for the watchdog" bash -c "journalctl -u qcryptd --no-pager -o cat | grep -qi watchdog"
eventually 60 "the new qcryptd found the chain open" state_is vault open
eventually 60 "qcryptctl watch followed it too" started 2
kill "$watcher" 2>/dev/null
rm -f /run/systemd/system/qcryptd.service.d/10-test-watchdog.conf
systemctl daemon-reload

# Killed mid-open: the attach to work is held by the simulator, qcryptd gets SIGKILL.
check "close the chain" qcryptctl close vault
sim fault admin.vm.device.block.Attach hold work >/dev/null
c=$(cursor)
qcryptctl open vault > /tmp/open.out 2>&1 &
check "the open reached the attach to work" sim wait-fault 120
kill -KILL "$(mainpid)"
sim release >/dev/null
sim clear-faults >/dev/null
eventually 60 "systemd restarted the killed qcryptd" active
check "with the unit as shipped" bash -c '! systemctl show -p DropInPaths --value qcryptd | grep -q .'
eventually 120 "its journal told it to roll the open back" \
  bash -c "journalctl -u qcryptd --after-cursor '$c' -o verbose --no-pager | grep -q 'DECISION=roll back'"
eventually 120 "then it opened the chain afresh" state_is vault open
check "the marker reads" qube work 'grep -q marker /mnt/vault/marker'
