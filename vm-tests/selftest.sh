#!/bin/bash
# Self-test of the bed: a passing scenario must pass, a wrong checksum and a hang must be
# reported as failures (run.sh exits 1), and a guest over the time limit must make run.sh
# exit 3. Exit 0 only if the bed behaved exactly so.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
T0=$(date +%s)
OUTPUT=$("$HERE/run.sh" 00-bed "$HERE/selftest/fails-on-purpose.sh" "$HERE/selftest/hangs.sh" 2>&1); RC=$?
echo "$OUTPUT" | sed -n '/vm-tests summary/,$p'
ok=1
[ $RC -eq 1 ] || { echo "selftest: expected exit 1, got $RC"; ok=0; }
echo "$OUTPUT" | grep -q '^SCENARIO PASS 00-bed' || { echo "selftest: 00-bed did not pass"; ok=0; }
echo "$OUTPUT" | grep -q '^SCENARIO FAIL fails-on-purpose' || { echo "selftest: the wrong checksum was not reported"; ok=0; }
echo "$OUTPUT" | grep -q '^SCENARIO FAIL hangs .*TIMED OUT' || { echo "selftest: the hang was not reported as a time-out"; ok=0; }
echo "$OUTPUT" | grep -q '^    FAIL wrong-checksum-must-fail' || { echo "selftest: the failing check was not named"; ok=0; }
# The outer limit: a guest that cannot finish in 20 s must be killed and reported (exit 3).
"$HERE/run.sh" --timeout 20 00-bed > /dev/null 2>&1; RC2=$?
[ $RC2 -eq 3 ] || { echo "selftest: expected exit 3 for a guest over the time limit, got $RC2"; ok=0; }
echo "selftest: $(( $(date +%s) - T0 )) s"
if [ $ok -eq 1 ]; then echo "selftest: 4 passed, 0 failed"; exit 0; fi
echo "selftest: the bed misreported"; exit 1
