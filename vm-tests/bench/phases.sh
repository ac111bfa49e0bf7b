#!/bin/bash
# timeout: 1500
# Where the time of a run with nothing to copy goes (not part of the CI set): one run of
# 2000 unchanged files under strace (seccomp filter, so only the listed calls stop), then a
# timeline of the programs started and of every sync, rename and mount call, relative to the
# start, with the seconds spent inside each call.
#   vm-tests/run.sh vm-tests/bench/phases.sh
#   BENCH_WAN  netem on the guest's loopback for the two runs, e.g. "delay 25ms rate
#              50mbit" (default: none, plain loopback); the timeline then shows where the
#              round trips are. Also traced then: openat, unlinkat and statfs.
source "$(dirname "$0")/../lib/common.sh"
source "$(dirname "$0")/lib.sh"
P=phases
SRC=/srv/phases-data
check profile scenario_profile $P 1G "$SRC"
check data small_tree "$SRC" 2000
check init "$E2E_BIN" init $P
EXTRA=
if [ -n "${BENCH_WAN:-}" ]; then
  modprobe sch_netem 2>/dev/null
  check netem tc qdisc add dev lo root netem $BENCH_WAN limit 100000
  EXTRA=,openat,unlinkat,statfs
fi
check run-1 "$E2E_BIN" run $P
T=$E2E_OUT/phases.strace
a=$(_uptime)
check run-2-traced strace -f --seccomp-bpf -ttt -T -o "$T" \
  -e trace=execve,syncfs,fsync,fdatasync,sync,renameat,renameat2,rename,mount,umount2,ioctl,exit_group$EXTRA \
  "$E2E_BIN" -v run $P
b=$(_uptime)
metric run2_traced_s "$(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.1f", b-a}')"
# Timeline: seconds from the first line; execve shows the program, others their duration.
awk 'NR==1{t0=$2} {
  rel=$2-t0; line=$0; sub(/^[0-9]+ +[0-9.]+ +/, "", line)
  if (line ~ /^execve\(/) { split(line, q, "\""); printf "%7.2f pid %s exec %s\n", rel, $1, q[2] }
  else if (line ~ /^(syncfs|fsync|fdatasync|sync|rename|renameat2?|mount|umount2|unlinkat|statfs)\(/ ||
           (line ~ /^openat\(/ && line ~ /<[0-9.]+>$/ && line !~ /<0\.00[0-9]+>$/) ||
           (line ~ /^ioctl\(.*(LOOP_|DM_|0x4c)/)) {
    d=line; sub(/.*</, "", d); sub(/>.*/, "", d); n=line; sub(/\(.*/, "", n)
    printf "%7.2f pid %s %s %.3fs %s\n", rel, $1, n, d, substr(line, 1, 90) }
  else if (line ~ /^\+\+\+ exited/) printf "%7.2f pid %s exited\n", rel, $1
}' "$T" | tee "$E2E_OUT/phases-timeline.txt" | head -150
[ -n "${BENCH_WAN:-}" ] && tc qdisc del dev lo root
check no-leftovers assert_no_leftovers
