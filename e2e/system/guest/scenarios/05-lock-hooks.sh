# The cross-machine lock beside the container, and the chain's hooks, inside the sandbox.
check "the hooks ran at each open and close so far, in order" \
  bash -c '[ "$(tr "\n" " " < /run/qcryptd/hooks.log)" = "pre-open post-close pre-open post-close pre-open " ]'
check "a hook cannot write /etc (the sandbox keeps it read-only)" test ! -e /etc/qcrypt-hook-was-here
id=$(cat /etc/machine-id)
check "the read-write open wrote this machine's lock beside the container" \
  bash -c "qube sys-usb 'cat /home/user/vault.luks.qcrypt-lock' | grep -q $id"
check "qcryptctl close vault" qcryptctl close vault
check "the close removed the lock" qube sys-usb '! test -e /home/user/vault.luks.qcrypt-lock'
qube sys-usb 'echo "qcrypt-lock 1 machine=0123456789abcdef0123456789abcdef chain=vault time=1764547200" > /home/user/vault.luks.qcrypt-lock'
out=$(qcryptctl open vault 2>&1)
if [ $? != 0 ] && printf '%s' "$out" | grep -q "another machine"; then ok "another machine's lock refuses the open"; else not_ok "another machine's lock refuses the open"; printf '%s\n' "$out" | indent; fi
check "--break-lock replaces a stale lock and opens" qcryptctl open --break-lock vault
check "the lock is this machine's now" bash -c "qube sys-usb 'cat /home/user/vault.luks.qcrypt-lock' | grep -q $id"
