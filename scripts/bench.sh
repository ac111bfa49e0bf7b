#!/bin/bash
# Benchmark e2ebackup against restic, borg and the raw `ssh cat` of the same bytes in one VM
# boot (vm-tests/bench/compare.sh), and print the tables (vm-tests/bench/table.py).
# Run as root on Debian. Installs what it needs (the peers too).
#   scripts/bench.sh            # 2k and 20k small files, each over the WAN profile (netem:
#                               # 25 ms each way, 50 Mbit/s) and over plain loopback
#   scripts/bench.sh --scale    # the 100k-file variant (both profiles; hours)
#   scripts/bench.sh --wan      # only the WAN profile (--lo: only loopback)
# Measured under QEMU TCG on the 2-core host (docs/benchmarks.md, runs 11 and 12), WAN
# profile, every tool: a 2k cell takes about 4 min, a 20k cell about 14 min. At 100k,
# e2ebackup alone (BENCH_TOOLS=e2e) takes 18 min; restic's full backup alone would take
# most of an hour there.
# BENCH_SCALES, BENCH_PROFILES, BENCH_TOOLS, BENCH_WAN override (see compare.sh); the tables
# are also written to target/bench/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
TIMEOUT=21600
while [ $# -gt 0 ]; do
  case "$1" in
    --scale) export BENCH_SCALES=${BENCH_SCALES:-100000}; TIMEOUT=86400 ;;
    --wan) export BENCH_PROFILES=wan ;;
    --lo) export BENCH_PROFILES=lo ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "bench: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
scripts/install-deps.sh restic borgbackup
cargo build --release --locked
# The guest's tmpfs root holds the restic and borg caches; the data sets live on the
# guest's virtio disk.
rc=0
a=$(date +%s)
E2E_BIN="$PWD/target/release/e2ebackup" VM_MEM=${VM_MEM:-4096} \
  vm-tests/run.sh --timeout "${BENCH_TIMEOUT:-$TIMEOUT}" vm-tests/bench/compare.sh || rc=$?
b=$(date +%s)
RUN=$(ls -td target/vm-tests/runs/*/ | head -1)
mkdir -p target/bench
{
  echo "Command: scripts/bench.sh $* (BENCH_SCALES=\"${BENCH_SCALES:-2000 20000}\" BENCH_PROFILES=\"${BENCH_PROFILES:-wan lo}\");" \
    "$(date -u +%Y-%m-%d), kernel $(sed -n 's/^boot: kernel \([^,]*\),.*/\1/p' "$RUN/boot.txt"), $(nproc) host cores, QEMU TCG;" \
    "$((b - a)) s from boot to power-off"
  echo
  python3 vm-tests/bench/table.py "$RUN/bench.txt"
} | tee target/bench/results.md
echo "bench: raw figures in ${RUN}bench.txt, tables in target/bench/results.md"
exit $rc
