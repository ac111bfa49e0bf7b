# Sourced by the bench scenarios after lib/common.sh.
#   sampled LOG CMD...  run CMD (output to LOG), sampling its peak RSS every 0.2 s; sets
#                      RUN_S (wall seconds), RUN_RSS_KIB (VmHWM of CMD's own process),
#                      RUN_CPU_PCT (busy % of all vCPUs over the run, from /proc/stat:
#                      near 100 = the emulated CPU is the limit, well below = waiting,
#                      e.g. on round trips) and RUN_RC.
#   bench_step NAME SEP EMIT CMD...
#                      `sampled` into $E2E_OUT/bench-NAME.log; EMIT (a function taking KEY
#                      VALUE) gets NAME${SEP}s, NAME${SEP}rss_kib and NAME${SEP}cpu_pct; a
#                      check NAME that fails if CMD does; returns CMD's exit code.
#   small_tree DIR N   N files of 2 KiB of random bytes in 280 directories (40 x 7), as
#                      phases.sh and ab.sh walk them.
small_tree() {
  python3 - "$1" "$2" <<'PY'
import os, sys
for i in range(int(sys.argv[2])):
    d = os.path.join(sys.argv[1], "d%02d" % (i % 40), "s%d" % (i % 7))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%05d" % i), "wb") as f:
        f.write(os.urandom(2048))
PY
}

# A pipe nobody writes to: `read -t` on it is a sleep without forking (a process start
# costs ~0.1 s of emulated CPU, which the sampler must not steal from the measured tool).
[ -p /run/bench-tick ] || mkfifo /run/bench-tick; exec 9<>/run/bench-tick
# "busy total" jiffies of all CPUs (iowait counts as idle: it is waiting).
_cpu_ticks() { awk '/^cpu /{t=0; for(i=2;i<=NF;i++) t+=$i; print t-$5-$6, t}' /proc/stat; }
sampled() {
  local log=$1 a b pid k v c0 c1
  shift
  RUN_RSS_KIB=0
  read -r -a c0 <<< "$(_cpu_ticks)"
  a=$(_uptime)
  "$@" > "$log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    while read -r k v _; do [ "$k" = VmHWM: ] && RUN_RSS_KIB=$v; done < "/proc/$pid/status" 2>/dev/null
    read -r -t 0.2 -u 9 _
  done
  wait "$pid"; RUN_RC=$?
  b=$(_uptime)
  read -r -a c1 <<< "$(_cpu_ticks)"
  RUN_S=$(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.1f", b-a}')
  RUN_CPU_PCT=$(( 100 * (c1[0] - c0[0]) / (c1[1] - c0[1] + 1) ))
}
bench_step() {
  local name=$1 sep=$2 emit=$3
  shift 3
  echo "[$(_uptime)] >>> bench $name: $*"
  sampled "$E2E_OUT/bench-$name.log" "$@"
  "$emit" "$name${sep}s" "$RUN_S"
  "$emit" "$name${sep}rss_kib" "$RUN_RSS_KIB"
  "$emit" "$name${sep}cpu_pct" "$RUN_CPU_PCT"
  if [ "$RUN_RC" -eq 0 ]; then echo "PASS $name ${RUN_S}s" >> "$_CHECKS"
  else echo "FAIL $name (exit $RUN_RC; see bench-$name.log)" | tee -a "$_CHECKS"; tail -5 "$E2E_OUT/bench-$name.log"; fi
  return "$RUN_RC"
}
