#!/bin/bash
# Benchmark e2ebackup against restic, borg and the physical limit in one VM boot
# (vm-tests/bench/compare.sh), and print the tables (vm-tests/bench/table.py).
# Run as root on Debian. Installs what it needs (the peers too). About 25 minutes under
# software emulation with the defaults (three runs measured); BENCH_FILES, BENCH_MIB,
# BENCH_ALLOC_SIZES scale it.
#   scripts/bench.sh            # results also in target/bench/results.md
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
scripts/install-deps.sh restic borgbackup
cargo build --release --locked
# The guest's tmpfs root holds the restic and borg caches; the data set lives on the
# guest's virtio disk.
rc=0
E2E_BIN="$PWD/target/release/e2ebackup" VM_MEM=${VM_MEM:-4096} \
  vm-tests/run.sh --timeout 3600 vm-tests/bench/compare.sh || rc=$?
RUN=$(ls -td target/vm-tests/runs/*/ | head -1)
mkdir -p target/bench
{
  echo "Command: scripts/bench.sh (BENCH_FILES=${BENCH_FILES:-2000} BENCH_MIB=${BENCH_MIB:-128});" \
    "$(date -u +%Y-%m-%d), kernel $(sed -n 's/^boot: kernel \([^,]*\),.*/\1/p' "$RUN/boot.txt"), $(nproc) host cores, QEMU TCG"
  echo
  python3 vm-tests/bench/table.py "$RUN/bench.txt"
} | tee target/bench/results.md
echo "bench: raw figures in ${RUN}bench.txt, tables in target/bench/results.md"
exit $rc
