# A configured chain opens by itself when work starts and closes when it shuts down;
# what work wrote is there after the reopen. systemctl reload makes qcryptd read it. Its
# hooks run inside qcryptd's sandbox (checked in 05).
sim shutdown work # luks-init --autostart started it
chain_file vault "source vm=sys-usb
source file=/home/user/vault.luks
key=vault
destination vm 1=mediator
destination vm 2=work
destination mount point=/mnt/vault
read-only=false
startup interval=0
pre open command=echo pre-open >> /run/qcryptd/hooks.log
post close command=echo post-close >> /run/qcryptd/hooks.log; touch /etc/qcrypt-hook-was-here"
check "systemctl reload qcryptd" systemctl reload qcryptd
eventually 60 "the reload brought the chain: it waits for work" state_is vault waiting
sim start work
eventually 120 "work started: the chain opened by itself" state_is vault open
check "work writes into the plaintext" qube work 'echo "$(cat /etc/hostname) marker" > /mnt/vault/marker && sync'
check "the plaintext is mounted nosuid,nodev" bash -c "qube work 'findmnt -n -o OPTIONS /mnt/vault' | grep -q nosuid,nodev"
sim shutdown work
eventually 120 "work shut down: the chain closed and waits again" state_is vault waiting
check "nothing of the chain is left in mediator" bash -c "[ -z \"\$(qube mediator 'ls /dev/mapper | grep -vx control')\" ]"
sim start work
eventually 120 "work started again: the chain opened again" state_is vault open
check "the marker is there after the reopen" qube work 'grep -q marker /mnt/vault/marker'
