# luks-init inside the sandbox: dom0's loop device, cryptsetup and mkfs in qcryptd's
# private directory, with systemd-udevd running (as on dom0) and without it (libdevmapper
# then makes the /dev/mapper node itself). Before, keystore init makes the key store
# (the new password twice); the first luks-init keeps its keys there. LUKS1 layers:
# their 2 MiB headers keep the containers small under TCG.
check "keystore init makes the key store (the new password twice)" \
  bash -c "printf '%s\n%s\n' $PASSWORD $PASSWORD | qcryptctl keystore init"
check "the new store is unlocked" bash -c "qcryptctl keystore status | grep -q ': unlocked'"
check "systemd-udevd runs" systemctl is-active systemd-udevd
check "luks-init of a 2-layer container with udev, keys also into the key store" \
  qcryptctl luks-init --autostart --size 12M --fs ext4 --keystore // \
    --cy mediator "$FASTKDF --type luks1" --cy work "$FASTKDF --type luks1" sys-usb /home/user/vault.luks vault mediator work
systemctl stop systemd-udevd.service systemd-udevd-control.socket systemd-udevd-kernel.socket
check "luks-init of a 1-layer container without udev" \
  qcryptctl luks-init --autostart --size 8M --fs ext4 --cy work "$FASTKDF --type luks1" sys-usb /home/user/spare.luks spare work
systemctl start systemd-udevd.service
check "udev is back" systemctl is-active systemd-udevd
check "work holds both new keys" qube work 'test -s /home/user/.qcrypt/keys/vault && test -s /home/user/.qcrypt/keys/spare'
check "nothing of luks-init is left in dom0 (no mapper, no loop device, no private files)" \
  bash -c '! ls /dev/mapper | grep -q qcrypt-init && ! losetup -a | grep -q luks-init && [ -z "$(ls -A /run/qcryptd/luks-init 2>/dev/null)" ]'
