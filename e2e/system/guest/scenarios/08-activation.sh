# D-Bus activation through systemd on dbus-broker: a stopped qcryptd is started as
# qcryptd.service (not a second one beside it) for a user in group qubes; a user in no
# group is refused, and nobody starts a disabled qcryptd.
check "systemctl stop qcryptd" systemctl stop qcryptd
check "quser's qcryptctl list starts qcryptd through the bus" as quser qcryptctl list
check "qcryptd.service is active" active
check "exactly one qcryptd runs" test "$(pgrep -c -x qcryptd)" = 1
check "root introspects qcryptd on the real bus" bash -c "busctl --system introspect org.qcrypt.Qcryptd1 /org/qcrypt/Qcryptd1 | grep -q org.qcrypt.Qcryptd1.Manager"
check "systemctl stop qcryptd" systemctl stop qcryptd
refused "a user in no group pings it: refused by the policy" as stranger busctl --system call org.qcrypt.Qcryptd1 /org/qcrypt/Qcryptd1 org.freedesktop.DBus.Peer Ping
if active; then
  note "dbus-broker started the enabled qcryptd for that refused ping (bus1/dbus-broker#462): a known gap, docs/security.md"
  systemctl stop qcryptd
fi
check "systemctl disable --now qcryptd" systemctl disable --now qcryptd
refused "a user in no group pings a disabled qcryptd: refused" as stranger busctl --system call org.qcrypt.Qcryptd1 /org/qcrypt/Qcryptd1 org.freedesktop.DBus.Peer Ping
check "and it did not start" inactive
refused "quser's list does not start a disabled qcryptd" as quser qcryptctl list
check "and it did not start" inactive
check "systemctl enable --now qcryptd" systemctl enable --now qcryptd
eventually 60 "the chain is found open" state_is vault open
