# lib.sh: what the scenarios share. Each check prints one TAP line, "ok N - what" or
# "not ok N - what" followed by what went wrong as "#" lines; the host test reads them.

SIM=/usr/lib/qubes-sim/qubes-sim
SOCK=/var/run/qubesd.sock
CONF=/etc/qcryptd/default
# Real argon2 takes seconds per key slot under qemu's TCG: luks-init gets pbkdf2.
FASTKDF="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"
PASSWORD=qcrypt-system-test-password

checks=0
failed=0

ok() { checks=$((checks + 1)); echo "ok $checks - $*"; }
not_ok() { checks=$((checks + 1)); failed=$((failed + 1)); echo "not ok $checks - $*"; }
# note: what a check saw, for the reader.
note() { echo "# $*"; }
# indent shows a command's output under a failed check.
indent() { tail -n "${1:-20}" | sed 's/^/#   /'; }

# check WHAT CMD...: ok when CMD succeeds; its output is shown when it does not.
check() {
  local what=$1 out
  shift
  if out=$("$@" 2>&1); then ok "$what"; else not_ok "$what"; printf '%s\n' "$out" | indent; fi
}

# refused WHAT CMD...: ok when CMD fails.
refused() {
  local what=$1 out
  shift
  if out=$("$@" 2>&1); then not_ok "$what (it succeeded)"; printf '%s\n' "$out" | indent; else ok "$what"; fi
}

# eventually SECS WHAT CMD...: ok once CMD succeeds; not ok when it has not within SECS
# (a deadline for a slow guest, not a pace: CMD is asked every 0.2 s).
eventually() {
  local secs=$1 what=$2 end
  shift 2
  end=$(($(date +%s) + secs))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$end" ]; then
      not_ok "$what (not within $secs s)"
      "$@" 2>&1 | indent 10
      return 1
    fi
    sleep 0.2
  done
  ok "$what"
}

sim() { "$SIM" ctl --socket "$SOCK" "$@"; }

# qube VM SCRIPT: runs SCRIPT as root in a simulated qube (what qubes.VMShell does).
qube() { printf '%s\n' "$2" | "$SIM" qrexec-client -d "$1" 'root:QUBESRPC qubes.VMShell+ dom0'; }

as() { local user=$1; shift; runuser -u "$user" -- "$@"; }

# state CHAIN: the chain's state as qcryptctl lists it.
state() { qcryptctl list 2>/dev/null | awk -v c="$1" '$1 == c { print $2 }'; }
state_is() { [ "$(state "$1")" = "$2" ]; }

mainpid() { systemctl show -p MainPID --value qcryptd; }
active() { [ "$(systemctl is-active qcryptd)" = active ]; }
inactive() { [ "$(systemctl is-active qcryptd)" = inactive ]; }

# journal_since CURSOR: qcryptd's journal since a cursor (journalctl --show-cursor).
cursor() { journalctl -n 0 --show-cursor -q | sed -n 's/^-- cursor: //p'; }
qcryptd_log_since() { journalctl -u qcryptd --after-cursor "$1" -o cat --no-pager; }

# chain_file NAME CONTENT: writes a chain file as root's alone.
chain_file() { install -m 0644 /dev/stdin "$CONF/$1.ini" <<<"$2"; }

# The checks run their commands in bash -c too: they see these.
export SIM SOCK CONF
export -f sim qube state state_is mainpid active inactive

# desktop_session USER DISPLAY: USER logs in to XFCE on a new Xvfb DISPLAY, with the
# notification log of xfce4-notifyd on (its xfconf channel, written before the session).
desktop_session() {
  local d=/home/$1/.config/xfce4/xfconf/xfce-perchannel-xml
  mkdir -p "$d"
  cat > "$d/xfce4-notifyd.xml" <<'XML'
<?xml version="1.0" encoding="UTF-8"?>
<channel name="xfce4-notifyd" version="1.0">
  <property name="notification-log" type="bool" value="true"/>
  <property name="log-level" type="uint" value="1"/>
  <property name="log-level-apps" type="uint" value="0"/>
</channel>
XML
  chown -R "$1:$1" "/home/$1/.config"
  Xvfb ":$2" -screen 0 1024x768x24 -nolisten tcp > "/tmp/xvfb$2.log" 2>&1 &
  for _ in $(seq 150); do DISPLAY=":$2" xdpyinfo >/dev/null 2>&1 && break; sleep 0.2; done
  DISPLAY=":$2" xhost "+si:localuser:$1" >/dev/null
  runuser -l "$1" -c "DISPLAY=:$2 exec startxfce4" > "/tmp/xfce-$1.log" 2>&1 &
}

# agents USER: how many notification agents USER runs.
agents() { pgrep -u "$1" -f '^/usr/bin/qcryptctl notify-agent$' | wc -l; }
# notified USER TEXT...: xfce4-notifyd logged notifications with each TEXT.
notified() {
  local u=$1 t
  shift
  for t; do grep -qF "$t" "/home/$u/.cache/xfce4/notifyd/log" 2>/dev/null || return 1; done
}
export -f agents notified
