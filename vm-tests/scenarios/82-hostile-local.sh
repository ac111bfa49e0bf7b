#!/bin/bash
# timeout: 900
# Issue 13, hostile local users (an unprivileged account on the client, `attacker`):
# (a) during a trim the NBD export is out of reach: no TCP listener appears at all (the
#     tunnel's local end is a Unix socket in a root-only directory, and the server's nbdkit
#     listens on a Unix socket beside the container), and connecting to either socket as the
#     attacker is refused;
# (b) a fake sshfs (argv[0] "sshfs", naming our mount point) does not make the teardown
#     fail: the run exits 0 and nothing is left mounted;
# (c) a victim file outside the tool's own is unchanged (sha256 and size).
source "$(dirname "$0")/../lib/common.sh"

P=localatk
SRC=/srv/localatk-data
RUN=/run/e2ebackup/$P
SOCK=$RUN/nbd/nbd.sock
SERVER_SOCK=/srv/backup/.$P.luks.nbd
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
# Hold the trim still (SIGSTOP) while the tunnel is looked at: unstopped, a trim finishes
# a second or two after the connect, and the checks below raced it (one CI run saw the
# tunnel's far end, the passing runs had looked after the trim was over). fstrim, a child, may finish meanwhile; the
# NBD connection and the tunnel stay up until e2ebackup goes on and tears them down.
kill -STOP $TPID
trap 'kill -CONT $TPID 2>/dev/null' EXIT
check trim-reached-nbd bash -c 'ls /sys/block/nbd*/pid >/dev/null 2>&1'
ss -ltnpH | tee "$E2E_OUT/listen-during.txt"
# Client and server are one machine here, so both ends would show in this table: no TCP
# listener may be new during the trim, neither the client's nor the server's nbdkit's.
awk '{print $4}' "$E2E_OUT/listen-during.txt" | sort | comm -13 "$E2E_OUT/listen-before.txt" - |
  tee "$E2E_OUT/listen-new.txt"
check no-tcp-listener-during-trim test ! -s "$E2E_OUT/listen-new.txt"
check server-nbdkit-on-unix-socket bash -c "pgrep -a -u backupuser nbdkit | tee /dev/stderr | grep -q -- '-U $SERVER_SOCK'"
ls -la "$RUN" "$RUN/nbd" "$SERVER_SOCK" 2>&1 | tee "$E2E_OUT/socket-dir.txt"
check socket-is-a-socket test -S "$SOCK"
check socket-dir-root-0700 bash -c "[ \"\$(stat -c %U:%a $RUN/nbd)\" = root:700 ]"
check server-socket-is-the-server-accounts bash -c "[ -S $SERVER_SOCK ] && [ \"\$(stat -c %U $SERVER_SOCK)\" = backupuser ]"
# The attacker's connects: PermissionError (EACCES: the client's 0700 directory; on the
# server, write permission on the socket itself) is the pass.
attacker_connect() {
  AS /usr/bin/python3 -c "
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect('$1')
except PermissionError as e:
    print('attacker connect:', e); sys.exit(0)
except Exception as e:
    print('attacker connect: unexpected', repr(e)); sys.exit(2)
print('attacker connect: CONNECTED'); sys.exit(1)
" 2>&1 | tee "$E2E_OUT/attacker-connect-$2.txt"
  return "${PIPESTATUS[0]}"
}
attacker_connect "$SOCK" client; ARC=$?
metric attacker_connect_exit "$ARC"
check attacker-cannot-connect test "$ARC" = 0
attacker_connect "$SERVER_SOCK" server; SRC_RC=$?
metric attacker_connect_server_exit "$SRC_RC"
check attacker-cannot-connect-to-the-server-socket test "$SRC_RC" = 0
kill -CONT $TPID
wait $TPID; TRC=$?
echo "trim: exit $TRC"; metric trim_exit "$TRC"
check trim-exits-0 test "$TRC" = 0
check trim-gave-space-back grep -q 'given back' "$E2E_OUT/trim.log"

# ---------------------------------------------------------------- (c)
VICTIM1=$(victim_sum); echo "victim after: $VICTIM1"
check victim-unchanged test "$VICTIM0" = "$VICTIM1"
check no-leftovers assert_no_leftovers
