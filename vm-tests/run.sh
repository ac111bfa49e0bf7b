#!/bin/bash
# Host side of the real-kernel test bed: boot Debian's kernel under QEMU (TCG, no KVM), with
# the host's root filesystem shared read-only over 9p plus a tmpfs overlay as the guest's
# root (so the guest has every installed tool), the repository and a writable results
# directory as two more 9p shares, and a sparse virtio disk as the "server" storage.
# The guest runs the scenarios and powers off; this script reports and sets the exit status.
#
#   vm-tests/run.sh [--timeout SECONDS] [--shell] [SCENARIO ...]
#     SCENARIO: a path, or a name in vm-tests/scenarios/ (default: all of them, sorted)
#   exit 0: every scenario passed; 1: a scenario failed; 3: qemu failed, hung or the guest
#   never reported; 2: the bed could not be prepared.
#   env: E2E_BIN (binary to test; default: build target/release/e2ebackup), KVER (kernel),
#        VM_MEM (MiB, default 3072), VM_CPUS (default 2); BENCH_* is passed to the guest
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
TIMEOUT=1500
SHELL_MODE=0
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --timeout) TIMEOUT=$2; shift 2 ;;
    --shell) SHELL_MODE=1; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

die() { echo "vm-tests: $*" >&2; exit 2; }

# ---- kernel: the newest installed Debian kernel that has its modules
if [ -z "${KVER:-}" ]; then
  for k in $(ls /boot/vmlinuz-*-amd64 2>/dev/null | sed 's#^/boot/vmlinuz-##' | sort -V -r); do
    if [ -f "/lib/modules/$k/modules.dep" ]; then KVER=$k; break; fi
  done
fi
[ -n "${KVER:-}" ] && [ -f "/boot/vmlinuz-$KVER" ] || die "no Debian kernel with modules found (apt-get install linux-image-amd64)"

# ---- scenarios -> paths inside the guest (the repo is mounted at /e2e/repo there)
SCEN=()
if [ ${#ARGS[@]} -eq 0 ] && [ $SHELL_MODE -eq 0 ]; then
  for f in "$HERE"/scenarios/*.sh; do SCEN+=("$f"); done
fi
for a in "${ARGS[@]}"; do
  if [ -f "$a" ]; then SCEN+=("$(cd "$(dirname "$a")" && pwd)/$(basename "$a")")
  elif [ -f "$HERE/scenarios/$a" ]; then SCEN+=("$HERE/scenarios/$a")
  elif [ -f "$HERE/scenarios/$a.sh" ]; then SCEN+=("$HERE/scenarios/$a.sh")
  else die "no scenario $a"; fi
done
GUEST_SCEN=()
for s in "${SCEN[@]}"; do
  case "$s" in "$REPO"/*) GUEST_SCEN+=("/e2e/repo/${s#"$REPO"/}") ;; *) die "scenario $s is outside the repository" ;; esac
done

# ---- binary
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
if [ -z "${E2E_BIN:-}" ]; then
  (cd "$REPO" && cargo build --release --quiet) || die "cargo build failed"
  E2E_BIN=$TARGET/release/e2ebackup
fi
[ -x "$E2E_BIN" ] || die "binary $E2E_BIN not found"

# ---- initramfs (cached per kernel; rebuilt when its inputs change)
mkdir -p "$REPO/target/vm-tests/runs"
INITRD=$REPO/target/vm-tests/initramfs-$KVER.cpio.gz
if [ ! -s "$INITRD" ] || [ "$HERE/lib/initramfs-init" -nt "$INITRD" ] || [ "$HERE/lib/build-initramfs.sh" -nt "$INITRD" ]; then
  KVER=$KVER "$HERE/lib/build-initramfs.sh" "$INITRD" "$HERE/lib/initramfs-init" || die "initramfs build failed"
fi

RUN=$REPO/target/vm-tests/runs/$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$RUN"
cp "$E2E_BIN" "$RUN/e2ebackup"
printf '%s\n' "${GUEST_SCEN[@]}" > "$RUN/scenarios.txt"
# BENCH_* settings reach the guest's scenarios (vm-tests/bench/compare.sh).
export -p | grep '^declare -x BENCH_[A-Z_]*=' > "$RUN/env.sh" || true
truncate -s 64G "$RUN/server.img"
MODE=tests; [ $SHELL_MODE -eq 1 ] && MODE=shell
QEMU=(qemu-system-x86_64
  -accel tcg,thread=multi -cpu max -smp "${VM_CPUS:-2}" -m "${VM_MEM:-3072}"
  -nographic -no-reboot -nic none
  -kernel "/boot/vmlinuz-$KVER" -initrd "$INITRD"
  -append "console=ttyS0 panic=-1 quiet loglevel=2 e2e_mode=$MODE"
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
  -virtfs "local,path=$REPO,mount_tag=repo,security_model=none,readonly=on,multidevs=remap"
  -virtfs "local,path=$RUN,mount_tag=out,security_model=none,multidevs=remap"
  -drive "file=$RUN/server.img,if=virtio,format=raw,cache=unsafe,discard=unmap")
echo "vm-tests: kernel $KVER, run dir ${RUN#"$REPO"/}, ${#GUEST_SCEN[@]} scenario(s), limit ${TIMEOUT}s"
if [ $SHELL_MODE -eq 1 ]; then "${QEMU[@]}"; exit $?; fi
T0=$(date +%s.%N)
timeout --kill-after=15 "$TIMEOUT" "${QEMU[@]}" </dev/null > "$RUN/console.log" 2>&1 &
QPID=$!
# Stream the console while it runs (the guest also writes every scenario log to $RUN).
tail -n +1 -F "$RUN/console.log" 2>/dev/null --pid=$QPID &
wait $QPID; QRC=$?
sleep 0.5
T1=$(date +%s.%N)
rm -f "$RUN/server.img"
WALL=$(awk -v a="$T0" -v b="$T1" 'BEGIN{printf "%.0f", b-a}')
echo
echo "==================== vm-tests summary (kernel $KVER)"
[ -f "$RUN/boot.txt" ] && cat "$RUN/boot.txt"
[ -f "$RUN/summary.txt" ] && cat "$RUN/summary.txt"
echo "wall time: ${WALL}s (qemu exit $QRC)"
PASSED=$(grep -c '^SCENARIO PASS' "$RUN/summary.txt" 2>/dev/null); PASSED=${PASSED:-0}
FAILED=$(grep -c '^SCENARIO FAIL' "$RUN/summary.txt" 2>/dev/null); FAILED=${FAILED:-0}
if [ "$QRC" -ne 0 ] || [ "$(cat "$RUN/status" 2>/dev/null)" != DONE ]; then
  MISSING=$(( ${#GUEST_SCEN[@]} - PASSED - FAILED ))
  [ "$QRC" -eq 124 ] || [ "$QRC" -eq 137 ] && echo "vm-tests: the guest exceeded the ${TIMEOUT}s limit and was killed"
  echo "vm-tests: the guest did not finish (qemu exit $QRC); $MISSING scenario(s) never reported; see $RUN/console.log"
  echo "vm-tests: $PASSED passed, $((FAILED + MISSING)) failed"
  exit 3
fi
MISSING=$(( ${#GUEST_SCEN[@]} - PASSED - FAILED ))
[ "$MISSING" -gt 0 ] && echo "vm-tests: $MISSING scenario(s) never ran or never reported"
echo "vm-tests: $PASSED passed, $((FAILED + MISSING)) failed"
[ "$FAILED" -eq 0 ] && [ "$MISSING" -eq 0 ] && exit 0
exit 1
