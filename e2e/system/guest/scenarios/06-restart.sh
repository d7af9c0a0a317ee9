# systemctl restart: the chain stays open, qcryptd finds it open again, its journal
# (in /run/qcryptd, kept across restarts) agrees.
check "the chain is open before" state_is vault open
old=$(mainpid)
c=$(cursor)
check "systemctl restart qcryptd" systemctl restart qcryptd
check "a new process" test "$(mainpid)" != "$old"
eventually 60 "found open after the restart" state_is vault open
check "the restart found it open (no open ran)" bash -c "journalctl -u qcryptd --after-cursor '$c' -o verbose --no-pager | grep -q CAUSE=found-open"
check "the journal is in qcryptd's state directory" test -s /run/qcryptd/chains/vault.json
