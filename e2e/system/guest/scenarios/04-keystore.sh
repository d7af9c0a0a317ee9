# The key store inside the sandbox: locked and unlocked, once answered by qcryptctl on
# its terminal and once by systemd's own tty agent; a chain injects work's key from it.
check "keystore lock" qcryptctl keystore lock
check "the store is locked" bash -c "qcryptctl keystore status | grep -q ': locked'"
check "unlock, answered by qcryptctl on its terminal" \
  bash -c "printf '%s\n' $PASSWORD | script -qec 'qcryptctl keystore unlock' /dev/null"
check "the store is unlocked" bash -c "qcryptctl keystore status | grep -q ': unlocked'"
check "keystore lock again" qcryptctl keystore lock
# qcryptctl without a terminal reads a line of its standard input, which stays empty:
# the answer comes from systemd-tty-ask-password-agent, on a terminal of its own.
mkfifo /tmp/no-answer
qcryptctl keystore unlock < /tmp/no-answer > /tmp/unlock.out 2>&1 &
unlock=$!
exec 7>/tmp/no-answer
eventually 60 "qcryptd's question is in systemd's directory" \
  bash -c 'grep -lq "qcrypt:job:" /run/systemd/ask-password/ask.* 2>/dev/null'
check "systemd-tty-ask-password-agent answers it" \
  bash -c "printf '%s\n' $PASSWORD | script -qec 'systemd-tty-ask-password-agent --query' /dev/null"
wait "$unlock"; code=$?
exec 7>&-
rm -f /tmp/no-answer
if [ "$code" = 0 ]; then ok "the unlock job ended well"; else not_ok "the unlock job ended with $code"; indent < /tmp/unlock.out; fi
check "the store is unlocked again" bash -c "qcryptctl keystore status | grep -q ': unlocked'"
# Injection: work loses its key; the chain file injects it from the store.
check "work's key is removed" qube work 'rm /home/user/.qcrypt/keys/vault'
sim shutdown work
eventually 120 "the chain closed with work" state_is vault waiting
sed -i 's|^destination vm 2=work$|destination vm 2=work\ndestination inj 2=keystore://|' "$CONF/vault.ini"
check "reload with the injection" systemctl reload qcryptd
eventually 60 "the changed chain is back, waiting for work" state_is vault waiting
sim start work
eventually 120 "work started: the chain opened with work's key from the store" state_is vault open
check "work holds its key again" qube work 'test -s /home/user/.qcrypt/keys/vault'
