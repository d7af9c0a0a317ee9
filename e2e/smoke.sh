# Runs inside the guest (e2e/boot.sh e2e/smoke.sh): a 2-layer LUKS2 container with the
# real tools, a marker written through both layers, and byte-wise checks that only the
# plaintext side holds it.
set -eu
export DM_DISABLE_UDEV=1
cd /tmp
head -c 32 /dev/urandom > k1; head -c 32 /dev/urandom > k2
truncate -s 64M c.luks
l=$(losetup -f --show c.luks)
fast="--pbkdf pbkdf2 --pbkdf-force-iterations 1000"
cryptsetup -q $fast --key-file k1 luksFormat "$l"
cryptsetup open --key-file k1 "$l" outer
cryptsetup -q $fast --key-file k2 luksFormat /dev/mapper/outer
cryptsetup open --key-file k2 /dev/mapper/outer inner
mkfs.ext4 -q /dev/mapper/inner
mkdir -p /mnt/p && mount /dev/mapper/inner /mnt/p
echo qcrypt-e2e-marker-4711 > /mnt/p/m
umount /mnt/p
if grep -q qcrypt-e2e-marker-4711 /dev/mapper/inner; then echo "plaintext layer holds the marker (expected)"; else echo "FAIL: marker not in the plaintext layer"; exit 1; fi
if grep -q qcrypt-e2e-marker-4711 /dev/mapper/outer; then echo "FAIL: marker in the middle layer"; exit 1; fi
cryptsetup close inner; cryptsetup close outer; losetup -d "$l"
if grep -q qcrypt-e2e-marker-4711 c.luks; then echo "FAIL: marker in the container file"; exit 1; fi
echo "container and middle layer hold no plaintext: ok"
cryptsetup open --key-file k1 "$l" outer 2>/dev/null && { echo "FAIL: loop still set up"; exit 1; } || true
uname -r
