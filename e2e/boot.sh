#!/usr/bin/env bash
# e2e/boot.sh SCRIPT: run SCRIPT as root in a qemu guest booted from Debian's kernel
# package, with the host's root file system (read-only 9p, writable through an overlay on
# tmpfs) and real loop, device-mapper and dm-crypt. The script's output and exit status
# come back through a writable 9p export; boot.sh exits with the script's status.
# e2e/run.sh uses it to run the end-to-end tests.
set -euo pipefail
script=$(realpath "$1")
cache=${E2E_CACHE:-/tmp/qcrypt-e2e-cache}
accel=${E2E_ACCEL:-auto}      # kvm, tcg or auto (kvm if it boots, else tcg)
mem=${E2E_MEM:-2048}
# The guest runs two test binaries of at most 20 minutes each (E2E_TEST_TIMEOUT) plus
# the boot: under twice the usual load the whole took 1292 s, too close to 1500.
timeout=${E2E_TIMEOUT:-2700}
mkdir -p "$cache"

need() { command -v "$1" >/dev/null || { echo "e2e: $1 is missing (apt-get install $2)" >&2; exit 2; }; }
need qemu-system-x86_64 qemu-system-x86
need busybox busybox-static
need cpio cpio
PATH=$PATH:/usr/sbin:/sbin
need depmod kmod

# The kernel: Debian 12's generic amd64 image (the -cloud- one has no 9p).
if ! ls "$cache"/root/boot/vmlinuz-* >/dev/null 2>&1; then
  search() { apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | cut -d' ' -f1 | sort -V | tail -n 1; }
  pkg=$(search)
  if [ -z "$pkg" ] && [ "$(id -u)" = 0 ]; then apt-get update -qq && pkg=$(search); fi
  [ -n "$pkg" ] || { echo "e2e: no linux-image-6.1.0-*-amd64 package found (apt-get update?)" >&2; exit 2; }
  (cd "$cache" && apt-get download "$pkg" >/dev/null && rm -rf root && dpkg -x linux-image-*.deb root)
fi
kver=$(ls "$cache/root/lib/modules")
depmod -b "$cache/root" "$kver"

# The initramfs: busybox and the modules, in dependency order, for 9p, overlay, loop,
# dm-crypt and the file systems the scenarios use.
initrd="$cache/initrd-$kver-$(sha256sum "$0" | cut -c1-12).cpio.gz"  # rebuilt when this script changes
if [ ! -e "$initrd" ]; then
  ir=$(mktemp -d)
  mkdir -p "$ir"/{bin,dev,proc,sys,lower,upper,newroot,results,mods}
  cp /bin/busybox "$ir/bin/busybox"
  for m in virtio_pci 9pnet_virtio 9p overlay loop dm_crypt dm_mod ext4 btrfs crc32c_generic crc32c_intel \
           xts aes_generic aesni_intel sha256_generic cbc ecb essiv algif_skcipher af_alg; do
    modprobe --show-depends -d "$cache/root" -S "$kver" "$m" 2>/dev/null | awk '$1 == "insmod" {print $2}'  || true
  done | awk '!seen[$0]++' > "$ir/mods.list.host"
  : > "$ir/mods/order"
  while read -r ko; do
    cp "$ko" "$ir/mods/"
    echo "$(basename "$ko")" >> "$ir/mods/order"
  done < "$ir/mods.list.host"
  rm "$ir/mods.list.host"
  cat > "$ir/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m 2>/dev/null; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /lower || { echo E2E-NO-HOSTROOT; poweroff -f; }
mount -t tmpfs -o size=75% tmp /upper && mkdir -p /upper/u /upper/w
mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w root /newroot || { echo E2E-NO-OVERLAY; poweroff -f; }
mkdir -p /newroot/e2e-results
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 results /newroot/e2e-results || { echo E2E-NO-RESULTS; poweroff -f; }
for d in proc sys dev; do mount --move /$d /newroot/$d; done
echo E2E-BOOTED
# The host's /tmp stays visible (a checkout may live there); scratch space is a tmpfs.
exec switch_root /newroot /bin/sh -c 'mount -t tmpfs run /run; mkdir -p /run/tmp /dev/pts /dev/shm; mount -t devpts pts /dev/pts; export TMPDIR=/run/tmp;
  cd /e2e-results && sh /e2e-results/script.sh > /e2e-results/output 2>&1; echo $? > /e2e-results/status; sync; echo o > /proc/sysrq-trigger; poweroff -f'
INIT
  chmod +x "$ir/init"
  (cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1 > "$initrd")
  rm -rf "$ir"
fi

results=$(mktemp -d /tmp/qcrypt-e2e-results.XXXXXX)
trap 'rm -rf "$results"' EXIT
cp "$script" "$results/script.sh"

boot() { # boot ACCEL: run the guest; 0 when the script's status came back
  local a=$1 cpu=() pid
  [ "$a" = tcg ] && cpu=(-cpu max)
  rm -f "$results/status" "$results/output"
  timeout "$timeout" qemu-system-x86_64 -accel "$a" "${cpu[@]}" -m "$mem" -smp 2 -nographic -no-reboot \
    -kernel "$cache/root/boot/vmlinuz-$kver" -initrd "$initrd" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$results",mount_tag=results,security_model=none \
    > "$results/console" 2>&1 &
  pid=$!
  if [ "$a" = kvm ]; then
    # KVM hung after kernel decompression on this kind of machine in a trial: if the
    # guest has not booted within the probe window, give up on KVM.
    for _ in $(seq $((${E2E_KVM_PROBE:-10} * 10))); do
      grep -q E2E-BOOTED "$results/console" 2>/dev/null && break
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if ! grep -q E2E-BOOTED "$results/console" 2>/dev/null; then
      kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
      echo "e2e: KVM guest did not boot in ${E2E_KVM_PROBE:-10} s; using TCG" >&2
      return 1
    fi
  fi
  wait "$pid" || true
  [ -e "$results/status" ]
}

start=$(date +%s.%N)
ok=false
if [ "$accel" != tcg ] && [ -w /dev/kvm ]; then
  if boot kvm; then ok=true; used=kvm; fi
fi
if ! $ok && [ "$accel" != kvm ]; then
  start=$(date +%s.%N)
  boot tcg && ok=true && used=tcg
fi
end=$(date +%s.%N)
if ! $ok; then
  echo "e2e: the guest did not report back; console:" >&2
  tail -n 40 "$results/console" >&2
  exit 3
fi
cat "$results/output"
status=$(cat "$results/status")
printf 'e2e: %s guest, %.1f s including boot, script exit status %s\n' "$used" "$(echo "$end - $start" | bc)" "$status"
exit "$status"
