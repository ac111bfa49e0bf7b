#!/bin/bash
# timeout: 1200
# Issue 14, faults of real servers, disks and clocks, on one container:
# - a run with the clock 10 years ahead, then back: retention deletes no history, prune
#   refuses while a snapshot is dated in the future, later ids follow the clock;
# - a source holding a bind mount of /proc: its contents are never copied;
# - a refused rollback leaves the container's bytes unchanged (sha256);
# - a container imaged on the server while the server was frozen mid-run (journal needs
#   recovery) read by a client that has only keyfile, pinned header and profile: snapshots,
#   restore (byte-identical), verify, with the image unchanged;
# - the server's disk filling mid-run: exit 1, a no-space message, older snapshots intact.
source "$(dirname "$0")/../lib/common.sh"

P=faults
C=$SERVER_DIR/$P.luks
SRC=/srv/faults-src
E2E() { "$E2E_BIN" "$@"; }
ids() { "$E2E_BIN" snapshots "$1" 2>/dev/null | grep -oE '^[0-9]{8}T[0-9]{6}Z' | sort -u; }
count_ids() { ids "$1" | wc -l; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
LOG=$E2E_OUT/85-faults.log

setup() {
  scenario_profile $P 256M "$SRC" "  keep_within: 30d"
  mkdir -p "$SRC/proc" "$SRC/d"
  for i in 1 2 3; do head -c 200000 /dev/urandom > "$SRC/d/f$i"; done
  echo precious > "$SRC/file"
  mount --bind /proc "$SRC/proc"
}
check setup setup
check init E2E init $P
check run-1 E2E run $P

# Exclusions: the /proc bound into the source is an empty directory in the snapshot.
excluded() {
  mkdir -p /mnt/f && E2E mount $P /mnt/f || return 1
  local n; n=$(ls -A /mnt/f/*"$SRC/proc" | wc -l)
  local ok=0; [ -f /mnt/f/*"$SRC/file" ] && [ "$n" = 0 ] || ok=1
  echo "files under the bound /proc in the snapshot: $n"
  E2E umount $P; return $ok
}
check proc-bind-not-copied excluded
umount "$SRC/proc"

# Clock 10 years ahead for one run, then back.
T0=$(date +%s)
check clock-ahead date -s "@$((T0 + 3652 * 86400))"
check run-clock-ahead E2E run $P
check clock-back date -s "@$(( $(date +%s) - 3652 * 86400 ))"
check history-kept-through-the-jump bash -c "[ \$('$E2E_BIN' snapshots $P 2>/dev/null | grep -oE '^[0-9]{8}T[0-9]{6}Z' | sort -u | wc -l) = 2 ]"
run_back() { E2E run $P 2>&1 | tee "$LOG.back"; [ "${PIPESTATUS[0]}" = 0 ] && grep -q 'dated in the future' "$LOG.back"; }
check run-after-clock-back-refuses-prune run_back
new_id_follows_clock() {
  local all; all=$(ids $P); echo "$all"
  [ "$(echo "$all" | wc -l)" = 3 ] && [ "$(echo "$all" | grep -c "^$(date -u +%Y)")" = 2 ]
}
check ids-follow-the-clock new_id_follows_clock
LAST=$(ids $P | grep "^$(date -u +%Y)" | tail -1)
metric last_complete "$LAST"

# A refused rollback writes nothing.
check keep-old-copy cp --sparse=always "$C" /srv/faults-old.luks
echo newer > "$SRC/file2"
check run-newer E2E run $P
rm -f "$SRC/file2"
check run-without-file2 E2E run $P
LAST=$(ids $P | grep "^$(date -u +%Y)" | tail -1)
swap_in_old() { mv "$C" /srv/faults-new.luks && cp --sparse=always /srv/faults-old.luks "$C" && chown backupuser: "$C"; }
check swap-in-old-copy swap_in_old
SHA_BEFORE=$(sha "$C")
check rollback-exits-6 bash -c "$E2E_BIN run $P 2>&1 | tee /dev/stderr | grep -q OLDER; [ \${PIPESTATUS[0]} = 6 ]"
check rollback-refusal-wrote-nothing bash -c "[ '$SHA_BEFORE' = \$(sha256sum $C | cut -d' ' -f1) ]"
check no-leftovers-after-rollback assert_no_leftovers
check swap-back bash -c "mv /srv/faults-new.luks $C && rm -f /srv/faults-old.luks"

# Crash image: hold a run while it writes (its rsync stopped), freeze the server (its sftp,
# internal to sshd), image the container, let both go on. The image is of a filesystem
# mounted read-write, so its journal needs recovery. (It used to sleep 4 s after rsync
# started instead of stopping it: on a quiet machine the run had finished by then.)
head -c $((12 << 20)) /dev/urandom > "$SRC/crash.bin"
crash_image() {
  "$E2E_BIN" run $P > "$LOG.crashrun" 2>&1 &
  local pid=$! i rs
  for i in $(seq 1 600); do rs=$(pgrep -x rsync | tr '\n' ' '); [ -n "$rs" ] && break; sleep 0.1; done
  [ -n "$rs" ] || { echo "rsync never started"; wait $pid; return 1; }
  kill -STOP $rs; sleep 1
  local sv; sv=$(pgrep -u backupuser -x sshd | tr '\n' ' ')
  [ -n "$sv" ] || { echo "no sshd of backupuser"; kill -CONT $rs; wait $pid; return 1; }
  kill -STOP $sv; sleep 1
  cp --sparse=always "$C" "$SERVER_DIR/faults2.luks"; local rc=$?
  kill -CONT $sv; kill -CONT $rs
  wait $pid; echo "the held run exited $?"
  chown backupuser: "$SERVER_DIR/faults2.luks"
  return $rc
}
check image-container-mid-run crash_image
fresh_client() {
  scenario_profile faults2 256M "$SRC"
  cp "$DEMO_DIR/$P.key" "$DEMO_DIR/faults2.key"; cp "$DEMO_DIR/$P.key.header" "$DEMO_DIR/faults2.key.header"
  rm -rf /var/lib/e2ebackup/faults2
}
check fresh-client-keyfile-header-profile fresh_client
IMG_SHA=$(sha "$SERVER_DIR/faults2.luks")
snap_crash() { E2E snapshots faults2 2>&1 | tee "$LOG.snap"; [ "${PIPESTATUS[0]}" = 0 ] && grep -q 'needs recovery' "$LOG.snap" && grep -q "$LAST" "$LOG.snap"; }
check crash-image-snapshots snap_crash
restore_crash() {
  rm -rf /srv/r && mkdir /srv/r && E2E restore faults2 "$LAST" /srv/r || return 1
  diff -r --exclude=crash.bin "$SRC" "/srv/r$SRC" && echo "restored tree identical to the source of $LAST"
}
check crash-image-restore-identical restore_crash
check crash-image-verify E2E verify faults2
check crash-image-not-written bash -c "[ '$IMG_SHA' = \$(sha256sum $SERVER_DIR/faults2.luks | cut -d' ' -f1) ]"
check no-leftovers-after-crash-image assert_no_leftovers
rm -f "$SERVER_DIR/faults2.luks" "$SRC/crash.bin"; rm -rf /srv/r

# The server's disk fills mid-run.
BEFORE=$(ids $P)
fill() {
  local avail; avail=$(df --output=avail -B1 /srv | tail -1)
  fallocate -l $((avail - (44 << 20))) /srv/filler && df -h /srv
  head -c $((64 << 20)) /dev/urandom > "$SRC/big.bin"
}
check fill-server-disk fill
full_run() {
  local a b; a=$(date +%s.%N)
  E2E run $P > "$LOG.full" 2>&1; local rc=$?
  b=$(date +%s.%N); metric disk_full_run_seconds "$(awk -v a=$a -v b=$b 'BEGIN{printf "%.1f", b-a}')"
  cat "$LOG.full" | tail -15; echo "exit $rc"
  [ $rc = 1 ] && grep -q 'ran out of space' "$LOG.full"
}
check disk-full-run-exits-1-says-no-space full_run
check no-leftovers-after-disk-full assert_no_leftovers
rm -f /srv/filler "$SRC/big.bin"
check older-snapshots-intact bash -c "[ \"\$($E2E_BIN snapshots $P 2>/dev/null | grep -oE '^[0-9]{8}T[0-9]{6}Z' | sort -u)\" = \"$BEFORE\" ]"
check verify-after-disk-full E2E verify $P
check run-after-space-freed E2E run $P
check final-verify-e2fsck-clean E2E verify $P
check final-no-leftovers assert_no_leftovers
