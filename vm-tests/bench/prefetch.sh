#!/bin/bash
# timeout: 1500
# A/B experiment (not part of the CI set): runs with nothing to copy, alternating two
# binaries on the same container, e.g. before and after a change to the run path.
#   BENCH_BEFORE_BIN=/e2e/repo/target/e2ebackup-before vm-tests/run.sh vm-tests/bench/prefetch.sh
# (the repository is the guest's /e2e/repo; E2E_BIN is the "after" binary). BENCH_FILES: 2000.
source "$(dirname "$0")/../lib/common.sh"
source "$(dirname "$0")/lib.sh"
P=ab
SRC=/srv/ab-data
BEFORE=${BENCH_BEFORE_BIN:?set BENCH_BEFORE_BIN to the binary to compare with}
N=${BENCH_FILES:-2000}
check profile scenario_profile $P 1G "$SRC" "  keep_last: 20"
check data small_tree "$SRC" "$N"
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
