# Package life: rpm -U of a newer build restarts qcryptd; the chain stays open and
# managed.
old=$(mainpid)
check "rpm -U of a newer build" rpm -U --nodeps rpm-new/qcrypt-*.rpm
check "the newer package is installed" bash -c "rpm -q qcrypt | grep -q '$(basename rpm-new/qcrypt-*.rpm .x86_64.rpm)'"
eventually 60 "the upgrade restarted qcryptd" bash -c "[ \"\$(systemctl show -p MainPID --value qcryptd)\" != $old ] && [ \"\$(systemctl is-active qcryptd)\" = active ]"
eventually 60 "the chain is still open" state_is vault open
check "and managed" bash -c "qcryptctl list | awk '\$1 == \"vault\"' | grep -qv ad-hoc"
check "still enabled" systemctl is-enabled qcryptd
