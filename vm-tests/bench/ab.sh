#!/bin/bash
# timeout: 3600
# A/B experiment (not part of the CI set): two binaries on the same container in one boot,
# alternating, so a drift of the shared machine hits both alike; e.g. before and after a
# change to the run path.
#   BENCH_BEFORE_BIN=/e2e/repo/target/e2ebackup-before vm-tests/run.sh vm-tests/bench/ab.sh
# (the repository is the guest's /e2e/repo; E2E_BIN is the "after" binary).
#   BENCH_FILES   files in the data set (default 2000; vm-tests/bench/lib.sh small_tree)
#   BENCH_WAN     netem on the guest's loopback for the whole run, e.g. "delay 25ms rate
#                 50mbit" (default: none, plain loopback)
#   BENCH_ROUNDS  rounds of one no-change run per binary (default 3)
#   BENCH_CHANGE  also one 1%-changed run per binary and round (default 0)
# Per run: wall seconds, the tool's peak RSS (VmHWM, KiB), and the guest's CPU use over the
# run (busy % of all vCPUs, from /proc/stat): near 100 means the emulated CPU is the limit,
# well below means the run waits (round trips).
source "$(dirname "$0")/../lib/common.sh"
source "$(dirname "$0")/lib.sh"
P=ab
SRC=/srv/ab-data
BEFORE=${BENCH_BEFORE_BIN:?set BENCH_BEFORE_BIN to the binary to compare with}
N=${BENCH_FILES:-2000}
# A container with room for the inodes: one per 64 KiB, three snapshots' directories.
SIZE=$(( N < 10000 ? 1 : (N * 4 * 64 / 1024 / 1024 + 1) ))G
check profile scenario_profile $P "$SIZE" "$SRC" "  keep_last: 20"
check data small_tree "$SRC" "$N"
if [ -n "${BENCH_WAN:-}" ]; then
  modprobe sch_netem 2>/dev/null
  check netem tc qdisc add dev lo root netem $BENCH_WAN limit 100000
fi
# timed NAME BIN ARGS...: wall, peak RSS and CPU busy of one run, as metrics NAME_s,
# NAME_rss_kib, NAME_cpu_pct.
timed() { local name=$1; shift; bench_step "$name" _ metric "$@"; }
check init "$E2E_BIN" init $P
timed full "$E2E_BIN" -v run $P
for round in $(seq 1 "${BENCH_ROUNDS:-3}"); do
  for which in before after; do
    bin=$E2E_BIN; [ $which = before ] && bin=$BEFORE
    timed "nochange_${which}_$round" "$bin" -vv run $P
    if [ "${BENCH_CHANGE:-0}" = 1 ]; then
      python3 - "$SRC" "$round$which" <<'PY'
import os, random, sys
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(sys.argv[1]) for f in fs)
rng = random.Random(sys.argv[2])
for p in rng.sample(files, max(1, len(files) // 100)):
    with open(p, "r+b") as f:
        f.write(os.urandom(1024))
PY
      timed "change1_${which}_$round" "$bin" -v run $P
    fi
  done
done
tc qdisc del dev lo root 2>/dev/null
check no-leftovers assert_no_leftovers
