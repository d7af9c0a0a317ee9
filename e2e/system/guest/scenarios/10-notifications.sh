# Notifications in real XFCE sessions: the two users who logged in after the install
# each got one notification agent from the installed XDG autostart entry. The chain's
# automatic opens and closes since then, and now a failed open, reached xfce4-notifyd
# in both sessions, proven by its own notification log, across every restart of qcryptd
# in between; the agent of a session that ends is gone.
eventually 120 "quser's XFCE session started its notification agent" bash -c '[ "$(agents quser)" -ge 1 ]'
eventually 120 "quser2's session started its own agent" bash -c '[ "$(agents quser2)" -ge 1 ]'
check "exactly one agent per session" test "$(agents quser)" = 1 -a "$(agents quser2)" = 1
check "xfce4-notifyd runs in each session" bash -c 'pgrep -u quser -x xfce4-notifyd && pgrep -u quser2 -x xfce4-notifyd'
check "the sessions are logind's" bash -c 'loginctl list-sessions --no-legend | grep -q quser2'
chain_file broken "source vm=sys-usb
source file=/home/user/spare.luks
key=no-such-key
destination vm 1=work
startup interval=0"
check "reload with a chain whose key is missing" systemctl reload qcryptd
eventually 120 "its automatic open failed" state_is broken failed
for u in quser quser2; do
  eventually 60 "$u's xfce4-notifyd logged: vault opened, mounted on /mnt/vault in work" \
    notified "$u" "qcrypt: vault opened" "Mounted on /mnt/vault in work."
  eventually 60 "$u's xfce4-notifyd logged: vault closed" notified "$u" "qcrypt: vault closed" "The chain is closed."
  eventually 60 "$u's xfce4-notifyd logged: broken failed, with where to look" \
    notified "$u" "qcrypt: broken failed" "Details: qcryptctl status broken"
done
rm -f "$CONF/broken.ini"
check "reload without it" systemctl reload qcryptd
# quser2 logs out: its session bus goes, and its agent with it; quser's stays.
pkill -u quser2 -x xfce4-session
eventually 120 "quser2's agent is gone with its session" bash -c '[ "$(agents quser2)" = 0 ]'
check "quser's agent still runs" test "$(agents quser)" = 1
