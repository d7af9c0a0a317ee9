# Ad-hoc chains by a user in group qubes, with the original's arguments.
spare="sys-usb /home/user/spare.luks spare work"
check "quser opens an ad-hoc chain" as quser qcryptctl open --mp /mnt/spare $spare
check "quser's status of it says open" as quser qcryptctl status --mp /mnt/spare -- $spare
check "quser lists it" bash -c "runuser -u quser -- qcryptctl list | grep -q 'spare@work (ad-hoc)'"
check "quser closes it" as quser qcryptctl close $spare
refused "a user in no group cannot list" as stranger qcryptctl list
refused "a user in no group cannot open" as stranger qcryptctl open $spare
