#!/bin/bash
# timeout: 3000
# Measurement (not part of the CI set): how long pruning a snapshot of 100k files takes.
# Two runs of a 100k-file tree (the second hard-links everything to the first), then
# `prune` with keep_last 1 removes the first: 100k unlinks + the directories.
#   vm-tests/run.sh --timeout 3600 vm-tests/bench/prune-100k.sh
source "$(dirname "$0")/../lib/common.sh"
P=bench
SRC=/srv/bench-data
N=${BENCH_FILES:-100000}
mk() {
  python3 - "$SRC" "$N" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, "d%03d" % (i // 1000))
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%06d" % i), "w") as f:
        f.write(str(i))
PY
}
check profile scenario_profile $P 8G "$SRC" "  keep_last: 2"
check make-tree mk
check init "$E2E_BIN" init $P
a=$(_uptime); check run-1 "$E2E_BIN" run $P; b=$(_uptime)
metric run1_100k_files_s "$(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.1f", b-a}')"
a=$(_uptime); check run-2 "$E2E_BIN" run $P; b=$(_uptime)
metric run2_100k_unchanged_s "$(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.1f", b-a}')"
sed -i 's/keep_last: 2/keep_last: 1/' /etc/e2ebackup/profiles/$P.yaml
a=$(_uptime); check prune "$E2E_BIN" prune $P; b=$(_uptime)
metric prune_100k_snapshot_command_s "$(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.1f", b-a}')"
check no-leftovers assert_no_leftovers
