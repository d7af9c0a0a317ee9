# Package life: rpm -e stops and disables qcryptd, removes its unit, policy and
# activation file, reloads the bus, and leaves the chain files, the key store and the
# open chain alone; installing again finds the chain open.
check "rpm -e qcrypt" rpm -e --nodeps qcrypt
check "qcryptd is stopped" inactive
check "its unit, policy and activation file are gone" \
  test ! -e /usr/lib/systemd/system/qcryptd.service -a ! -e /usr/share/dbus-1/system.d/org.qcrypt.Qcryptd1.conf \
  -a ! -e /usr/share/dbus-1/system-services/org.qcrypt.Qcryptd1.service
check "it is not enabled any more" test ! -e /etc/systemd/system/multi-user.target.wants/qcryptd.service -a ! -e /etc/systemd/system/dbus-org.qcrypt.Qcryptd1.service
check "the bus was reloaded: org.qcrypt.Qcryptd1 is not activatable" \
  bash -c '! busctl --system call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ListActivatableNames | grep -q "\"org.qcrypt.Qcryptd1\""'
check "the chain files are untouched" test -s "$CONF/vault.ini"
check "the key store is untouched" test -s /etc/blib/keys/keys.lks
check "the chain stays open" qube work 'findmnt /mnt/vault'
check "install again" rpm -i --nodeps rpm-new/qcrypt-*.rpm
check "systemctl enable --now qcryptd" systemctl enable --now qcryptd
eventually 60 "the chain is found open" state_is vault open
