#!/bin/bash
# PID 1 inside the guest, after the initramfs switched to the 9p+overlay root.
# Minimal userspace, the "backup server" (server-setup.sh), then every scenario listed in
# /e2e/out/scenarios.txt, each in its own bash with a time limit; results in /e2e/out.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# devtmpfs lacks the links udev would create (bash process substitution needs /dev/fd)
ln -sf /proc/self/fd /dev/fd; ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout; ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=0755,size=256m tmpfs /run
mkdir -p /run/lock
mount -t tmpfs -o mode=1777 tmpfs /tmp       # hide the host's /tmp seen through the 9p root
ip link set lo up
hostname e2e-guest
OUT=/e2e/out
echo "boot: kernel $(uname -r), userspace after $(cut -d' ' -f1 /proc/uptime) s" | tee "$OUT/boot.txt"
# The host's own e2ebackup state must not leak into the guest (the overlay hides it).
rm -rf /etc/e2ebackup /var/lib/e2ebackup /run/e2ebackup

LIB=$(dirname "$(readlink -f "$0")")
export E2E_BIN=$OUT/e2ebackup E2E_REPO=/e2e/repo E2E_OUT=$OUT
[ -f "$OUT/env.sh" ] && source "$OUT/env.sh"   # BENCH_* from the host (run.sh)
T0=$(cut -d' ' -f1 /proc/uptime)
if ! bash "$LIB/server-setup.sh" > "$OUT/setup.log" 2>&1; then
  cat "$OUT/setup.log"
  echo "SCENARIO FAIL bed-setup 0s (see setup.log)" >> "$OUT/summary.txt"
  echo DONE > "$OUT/status"; sync; umount "$OUT"; busybox poweroff -f
fi
T1=$(cut -d' ' -f1 /proc/uptime)
echo "boot: server set up in $(awk -v a="$T0" -v b="$T1" 'BEGIN{printf "%.1f", b-a}') s" | tee -a "$OUT/boot.txt"

if [ "${e2e_mode:-tests}" = shell ]; then
  echo "guest: shell; E2E_BIN=$E2E_BIN; source $LIB/common.sh for the helpers; 'busybox poweroff -f' to quit"
  setsid -c /bin/bash -l </dev/ttyS0 >/dev/ttyS0 2>&1
  busybox poweroff -f
fi

mkdir -p "$OUT/checks"
# The list is read on fd 3 and every scenario gets /dev/null as stdin: a scenario command
# that reads stdin (ssh does) must not swallow the rest of the list.
while IFS= read -r s <&3; do
  [ -n "$s" ] || continue
  name=$(basename "$s" .sh)
  limit=$(sed -n 's/^# timeout: *\([0-9]\+\).*/\1/p' "$s" | head -1); limit=${limit:-600}
  echo "---------------- scenario $name (limit ${limit}s)"
  a=$(cut -d' ' -f1 /proc/uptime)
  E2E_SCENARIO=$name timeout --kill-after=10 "$limit" bash "$s" </dev/null 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  b=$(cut -d' ' -f1 /proc/uptime)
  secs=$(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.0f", b-a}')
  np=$(grep -c '^PASS' "$OUT/checks/$name.txt" 2>/dev/null); np=${np:-0}
  nf=$(grep -c '^FAIL' "$OUT/checks/$name.txt" 2>/dev/null); nf=${nf:-0}
  why=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why=", TIMED OUT after ${limit}s"
  if [ "$rc" -eq 0 ] && [ "$nf" -eq 0 ] && [ "$np" -gt 0 ]; then st=PASS; else st=FAIL; fi
  line="SCENARIO $st $name ${secs}s (checks: $np passed, $nf failed; exit $rc$why)"
  echo "$line" | tee -a "$OUT/summary.txt"
  [ "$nf" -gt 0 ] && grep '^FAIL' "$OUT/checks/$name.txt" | sed 's/^/    /' | tee -a "$OUT/summary.txt"
  # Leave nothing behind for the next scenario, whatever this one did.
  pkill -x e2ebackup 2>/dev/null; pkill -x rsync 2>/dev/null
done 3< "$OUT/scenarios.txt"
echo DONE > "$OUT/status"
sync
umount "$OUT" 2>/dev/null
busybox poweroff -f
echo o > /proc/sysrq-trigger; sleep 30
