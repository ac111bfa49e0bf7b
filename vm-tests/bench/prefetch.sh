#!/bin/bash
# timeout: 1500
# A/B experiment (not part of the CI set): runs with nothing to copy, alternating two
# binaries on the same container, e.g. before and after a change to the run path.
#   BENCH_BEFORE_BIN=/e2e/repo/target/e2ebackup-before vm-tests/run.sh vm-tests/bench/prefetch.sh
# (the repository is the guest's /e2e/repo; E2E_BIN is the "after" binary). BENCH_FILES: 2000.
source "$(dirname "$0")/../lib/common.sh"
P=ab
SRC=/srv/ab-data
BEFORE=${BENCH_BEFORE_BIN:?set BENCH_BEFORE_BIN to the binary to compare with}
N=${BENCH_FILES:-2000}
mk() {
  python3 - "$SRC" "$N" <<'PY'
import os, sys
for i in range(int(sys.argv[2])):
    d = os.path.join(sys.argv[1], "d%02d" % (i % 40), "s%d" % (i % 7))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%05d" % i), "wb") as f:
        f.write(os.urandom(2048))
PY
}
check profile scenario_profile $P 1G "$SRC" "  keep_last: 20"
check data mk
check init "$E2E_BIN" init $P
check run-full "$E2E_BIN" run $P
for round in 1 2 3; do
  for which in before after; do
    bin=$E2E_BIN; [ $which = before ] && bin=$BEFORE
    a=$(_uptime)
    check "nochange-$which-$round" "$bin" -vv run $P
    b=$(_uptime)
    metric "nochange_${which}_$round" "$(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.1f", b-a}')"
  done
done
check no-leftovers assert_no_leftovers
