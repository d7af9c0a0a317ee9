# Install as a user does: the RPM with its scriptlets running for real, then the unit
# exactly as shipped enabled and started. Two desktop users log in (XFCE on Xvfb, as a
# display manager would start it): their sessions come up while the next scenarios run,
# and 10 checks what reached them.
check "rpm -i installs the package (its scriptlets run)" rpm -i --nodeps rpm-old/qcrypt-*.rpm
check "the unit, policy and activation file are where systemd and the bus read them" \
  test -f /usr/lib/systemd/system/qcryptd.service -a -f /usr/share/dbus-1/system.d/org.qcrypt.Qcryptd1.conf \
  -a -f /usr/share/dbus-1/system-services/org.qcrypt.Qcryptd1.service
# dbus-broker reads activation files at a ReloadConfig only: listing the name proves
# the scriptlet's reload.
check "the scriptlet reloaded the bus: org.qcrypt.Qcryptd1 is activatable" \
  bash -c 'busctl --system call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ListActivatableNames | grep -q "\"org.qcrypt.Qcryptd1\""'
note "after the preset: qcryptd is $(systemctl is-enabled qcryptd 2>&1)"
check "systemctl enable --now qcryptd" systemctl enable --now qcryptd
check "qcryptd is active" active
check "qcryptd owns its bus name" busctl --system status org.qcrypt.Qcryptd1
check "no drop-in loosens the unit" bash -c '! systemctl show -p DropInPaths --value qcryptd | grep -q .'
note "$(systemd-analyze security --no-pager qcryptd.service 2>&1 | tail -n 1)"
desktop_session quser 99
desktop_session quser2 98
