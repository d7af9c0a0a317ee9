#!/usr/bin/env bash
# e2e/run.sh: the real-kernel end-to-end tests (make e2e). Builds the shipped static
# binaries and the e2e test binary, then runs the tests as root on a kernel with loop
# and dm-crypt: on this machine when it has them (E2E_MODE=direct), otherwise in a qemu
# guest booted from Debian's kernel package (E2E_MODE=qemu, see boot.sh). The exit
# status is the tests'.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$PWD/bin/e2e
rm -rf "$out" && mkdir -p "$out"
CGO_ENABLED=0 go build -trimpath -o "$out/" ./cmd/qcryptd ./cmd/qcryptctl ./cmd/qubes-sim
CGO_ENABLED=0 go test -c -trimpath -o "$out/e2e.test" ./e2e

run=""
[ -n "${E2E_RUN:-}" ] && run="-test.run $(printf %q "$E2E_RUN")"

# The core scenarios run a second time with the real qubesd 4.3 as the Admin API
# (../shared/real-qubesd or QCRYPT_REAL_QUBESD; E2E_REAL=0 leaves them out). Missing, it is
# skipped with its reason, or a failure under QCRYPT_REQUIRE_REAL_QUBESD=1 (CI).
real=""
real_dir=${QCRYPT_REAL_QUBESD:-$(cd .. && pwd)/shared/real-qubesd}
why=""
if [ "${E2E_REAL:-1}" = 0 ] || [ -n "${E2E_RUN:-}" ]; then
  why="not asked for"
elif [ ! -x "$real_dir/start.sh" ]; then
  why="$real_dir/start.sh is missing"
elif ! /usr/bin/python3 -c 'import lxml, libvirt, libvirtaio, jinja2, docutils, yaml, pyinotify' 2>/dev/null; then
  why="its Python packages are missing (make deps)"
else
  real=$real_dir
fi
if [ -z "$real" ] && [ "$why" != "not asked for" ]; then
  if [ "${QCRYPT_REQUIRE_REAL_QUBESD:-}" = 1 ]; then echo "e2e: the real qubesd is required: $why" >&2; exit 1; fi
  echo "e2e: the core scenarios behind the real qubesd are skipped: $why"
fi
# With it, calls into qubes go through the real qrexec 4.3 (../shared/real-qrexec or
# QCRYPT_REAL_QREXEC), built here once into the cache (QCRYPT_CACHE) before the guest
# boots; missing, the stand-in qrexec-client serves, or CI fails (QCRYPT_REQUIRE_REAL_QREXEC=1).
realq=""
if [ -n "$real" ]; then
  realq_src=${QCRYPT_REAL_QREXEC:-$(cd .. && pwd)/shared/real-qrexec}
  if ! realq=$("$out/qubes-sim" build-real-qrexec "$realq_src" "${QCRYPT_CACHE:-}" 4.3 2>&1); then
    if [ "${QCRYPT_REQUIRE_REAL_QREXEC:-}" = 1 ]; then echo "e2e: the real qrexec is required: $realq" >&2; exit 1; fi
    echo "e2e: the core scenarios use the stand-in qrexec: $realq"
    realq=""
  fi
fi
core='^(TestLuksInitOpenWriteReopen|TestReadOnlyChain|TestAutoOpenOnStartAndCloseOnShutdown|TestAutoOpenOnPlug|TestDaemonKilledMidOpen)$'
cat > "$out/tests.sh" <<SCRIPT
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export QCRYPT_E2E=1 QCRYPT_E2E_BIN=$out DM_DISABLE_UDEV=1 E2E_LOGS=${E2E_LOGS:-0} E2E_CYCLES=${E2E_CYCLES:-8}
cd "\${TMPDIR:-/tmp}"
start=\$(date +%s)
"$out/e2e.test" -test.v -test.timeout ${E2E_TEST_TIMEOUT:-20m} $run
status=\$?
echo "e2e: tests took \$((\$(date +%s) - start)) s on kernel \$(uname -r)"
if [ -n "$real" ]; then
  start=\$(date +%s)
  E2E_REAL_QUBESD="$real" E2E_REAL_QREXEC="$realq" "$out/e2e.test" -test.v -test.timeout ${E2E_TEST_TIMEOUT:-20m} -test.run '$core' || status=1
  echo "e2e: the core scenarios behind the real qubesd 4.3${realq:+ and the real qrexec} took \$((\$(date +%s) - start)) s"
fi
exit \$status
SCRIPT

mode=${E2E_MODE:-auto}
if [ "$mode" = auto ]; then
  mode=qemu
  if [ "$(id -u)" = 0 ] && modprobe -q dm_crypt 2>/dev/null && modprobe -q loop 2>/dev/null && [ -e /dev/mapper/control ]; then
    mode=direct
  fi
fi
echo "e2e: running on $([ "$mode" = direct ] && echo "this machine's kernel" || echo "a qemu guest")"
if [ "$mode" = direct ]; then
  exec sh "$out/tests.sh"
fi
exec ./e2e/boot.sh "$out/tests.sh"
