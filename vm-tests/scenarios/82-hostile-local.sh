#!/bin/bash
# timeout: 900
# Issue 13, hostile local users (an unprivileged account on the client, `attacker`):
# (a) during a trim the NBD export is out of reach: no TCP listener appears on the client
#     (the tunnel's local end is a Unix socket in a root-only directory), and connecting to
#     that socket as the attacker is refused;
# (b) a fake sshfs (argv[0] "sshfs", naming our mount point) does not make the teardown
#     fail: the run exits 0 and nothing is left mounted;
# (c) a victim file outside the tool's own is unchanged (sha256 and size).
source "$(dirname "$0")/../lib/common.sh"

P=hostile
SRC=/srv/hostile-data
RUN=/run/e2ebackup/$P
SOCK=$RUN/nbd/nbd.sock
VICTIM=/var/lib/e2e-victim.bin
E2E() { "$E2E_BIN" "$@"; }
AS() { setpriv --reuid=attacker --regid=attacker --clear-groups "$@"; }

setup() {
  scenario_profile $P 256M "$SRC" "  keep_last: 1" &&
  mkdir -p "$SRC" && head -c 8M /dev/urandom > "$SRC/big" && echo small > "$SRC/small" &&
  { id attacker >/dev/null 2>&1 || useradd -M -d /nonexistent -s /bin/sh attacker; } &&
  head -c 4096 /dev/urandom > "$VICTIM" && chmod 0644 "$VICTIM"
}
victim_sum() { echo "$(sha256sum < "$VICTIM" | cut -d' ' -f1) $(stat -c %s "$VICTIM")"; }

check setup setup
VICTIM0=$(victim_sum); echo "victim before: $VICTIM0"
check init E2E init $P

# ---------------------------------------------------------------- (b) the fake sshfs
# `exec -a sshfs` sets argv[0]; the inner loop keeps it alive (sleep rejects extra arguments).
# setpriv itself in the background (not the AS function: $! would be a root subshell).
setpriv --reuid=attacker --regid=attacker --clear-groups \
  bash -c "exec -a sshfs bash -c 'while :; do sleep 1; done' x $RUN/server" </dev/null >/dev/null 2>&1 &
FAKE=$!
trap 'kill $FAKE 2>/dev/null' EXIT
sleep 1
check fake-sshfs-runs-as-attacker bash -c "ps -o user=,args= -p $FAKE | tee /dev/stderr | grep -q '^attacker *sshfs .*$RUN/server'"
"$E2E_BIN" run $P > "$E2E_OUT/run-with-fake.log" 2>&1; RC=$?
echo "run with a fake sshfs present: exit $RC"; metric run_with_fake_sshfs_exit "$RC"
check run-with-fake-sshfs-exits-0 test "$RC" = 0
check fake-sshfs-left-alone kill -0 $FAKE
check nothing-mounted-after-run bash -c "! grep -q ' $RUN/' /proc/mounts"
kill $FAKE; wait $FAKE 2>/dev/null

# ---------------------------------------------------------------- (a) the trim tunnel
rm -f "$SRC/big"
check run-after-delete E2E run $P
ss -ltnH | awk '{print $4}' | sort > "$E2E_OUT/listen-before.txt"
"$E2E_BIN" trim $P > "$E2E_OUT/trim.log" 2>&1 &
TPID=$!
for i in $(seq 1 900); do ls /sys/block/nbd*/pid >/dev/null 2>&1 && break; sleep 0.1; done
check trim-reached-nbd bash -c 'ls /sys/block/nbd*/pid >/dev/null 2>&1'
ss -ltnpH | tee "$E2E_OUT/listen-during.txt"
ss -ltnH | awk '{print $4}' | sort > "$E2E_OUT/listen-during-addrs.txt"
check no-new-tcp-listener-during-trim diff "$E2E_OUT/listen-before.txt" "$E2E_OUT/listen-during-addrs.txt"
check only-sshd-listens bash -c "! grep -v 'sshd' $E2E_OUT/listen-during.txt"
ls -la "$RUN" "$RUN/nbd" 2>&1 | tee "$E2E_OUT/socket-dir.txt"
check socket-is-a-socket test -S "$SOCK"
check socket-dir-root-0700 bash -c "[ \"\$(stat -c %U:%a $RUN/nbd)\" = root:700 ]"
# The attacker's connect: PermissionError (EACCES on the 0700 directory) is the pass.
AS /usr/bin/python3 -c "
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect('$SOCK')
except PermissionError as e:
    print('attacker connect:', e); sys.exit(0)
except Exception as e:
    print('attacker connect: unexpected', repr(e)); sys.exit(2)
print('attacker connect: CONNECTED'); sys.exit(1)
" 2>&1 | tee "$E2E_OUT/attacker-connect.txt"; ARC=${PIPESTATUS[0]}
metric attacker_connect_exit "$ARC"
check attacker-cannot-connect test "$ARC" = 0
wait $TPID; TRC=$?
echo "trim: exit $TRC"; metric trim_exit "$TRC"
check trim-exits-0 test "$TRC" = 0
check trim-gave-space-back grep -q 'given back' "$E2E_OUT/trim.log"

# ---------------------------------------------------------------- (c)
VICTIM1=$(victim_sum); echo "victim after: $VICTIM1"
check victim-unchanged test "$VICTIM0" = "$VICTIM1"
check no-leftovers assert_no_leftovers
