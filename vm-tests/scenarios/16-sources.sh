#!/bin/bash
# timeout: 1200
# Issue 29 items 1 and 5, issue 27 item 7: sources that are missing, unreadable or hostile.
# One profile, two sources: a directory of users' files (/srv/src16/home) and a loop ext4
# filesystem mounted at /mnt/src16 (`backup.require_mount`), keep_last: 2.
# (b) run 1: a file root cannot read (root's own sshfs of the server account, a file there
#     mode 000: the account cannot read it, as a share that squashes root) and another
#     user's sshfs below a source (`attacker`, through the setuid fusermount3): the snapshot
#     commits with exit 3, the file is listed in the log and `status --json`, the attacker's
#     mount is skipped with a warning;
# (c) run 2: a user's 320 MiB sparse file (`truncate`; more than the 256 MiB container, so
#     without `--sparse` the run would fail for space) costs the server under 4 MiB, a 4 GiB
#     one is skipped by `max_file_size: 3G` and named. (The issue's 2 GiB took over 10 min
#     under TCG on a loaded host: rsync reads and hashes every zero; 320 MiB shows the same.);
# (a) the loop filesystem unmounted: run 3 refuses (require_mount), run 4 without it refuses
#     (source emptied), runs 5 and 6 with --allow-shrink commit; the snapshot of run 2, the
#     last with the filesystem's data, is still there while keep_last: 2 pruned run 1's;
# (d) nothing left mounted or open, a victim file unchanged.
source "$(dirname "$0")/../lib/common.sh"

P=src16
SRC=/srv/src16/home
MNT=/mnt/src16
IMG=/var/tmp/src16.img
VICTIM=/var/lib/e2e-victim16.bin
AKEY=/var/tmp/attacker16/key
AUTH=/home/backupuser/.ssh/authorized_keys
PROFILE=/etc/e2ebackup/profiles/$P.yaml
E2E() { "$E2E_BIN" "$@"; }
AS() { setpriv --reuid=attacker --regid=attacker --clear-groups "$@"; }
victim_sum() { echo "$(sha256sum < "$VICTIM" | cut -d' ' -f1) $(stat -c %s "$VICTIM")"; }
SSHO="-o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"

setup() {
  scenario_profile $P 256M "$SRC, $MNT" "  keep_last: 2" &&
  sed -i "/^  sources:/a\\  require_mount: [$MNT]\\n  max_file_size: 3G" "$PROFILE" &&
  rm -rf /srv/src16 && mkdir -p "$SRC/alice" "$SRC/share" "$SRC/attacker/mnt" "$MNT" &&
  for i in $(seq 1 20); do echo "alice $i" > "$SRC/alice/f$i"; done &&
  truncate -s 16M "$IMG" && mkfs.ext4 -q -F "$IMG" && mount -o loop "$IMG" "$MNT" &&
  mkdir "$MNT/photos" && for i in $(seq 1 150); do echo "photo $i" > "$MNT/photos/p$i"; done &&
  { id attacker >/dev/null 2>&1 || useradd -M -d /nonexistent -s /bin/sh attacker; } &&
  chown attacker: "$SRC/attacker" "$SRC/attacker/mnt" &&
  head -c 4096 /dev/urandom > "$VICTIM" && chmod 0644 "$VICTIM" &&
  # The server account's files: one it cannot read itself.
  install -d -o backupuser -g backupuser /home/backupuser/share16 &&
  echo readable > /home/backupuser/share16/ok.txt && echo secret > /home/backupuser/share16/secret &&
  chown backupuser: /home/backupuser/share16/* && chmod 000 /home/backupuser/share16/secret &&
  # The attacker's key, let in for this scenario (the file is put back at the end).
  cp -a "$AUTH" /var/tmp/authorized_keys.src16 &&
  install -d -o attacker -m 0700 /var/tmp/attacker16 &&
  AS ssh-keygen -q -t ed25519 -N '' -f "$AKEY" && cat "$AKEY.pub" >> "$AUTH" &&
  FUSEMODE=$(stat -c %a /dev/fuse) && chmod 0666 /dev/fuse
}
check setup setup
echo "profile:"; cat "$PROFILE"
VICTIM0=$(victim_sum)

mounts() {
  sshfs $SSHO -o IdentityFile="$DEMO_DIR/id_ed25519" backupuser@127.0.0.1:share16 "$SRC/share" &&
  AS sshfs $SSHO -o IdentityFile="$AKEY" backupuser@127.0.0.1:share16 "$SRC/attacker/mnt" &&
  grep " $SRC/attacker/mnt " /proc/self/mountinfo && ! ls "$SRC/attacker/mnt" 2>/dev/null
}
check fuse-mounts-up mounts
check init E2E init $P

json() { E2E status $P --json | python3 -c "import json,sys; d=json.load(sys.stdin)['last_run']; print($1)"; }

# ---------------------------------------------------------------- (b) unreadable, foreign FUSE
E2E run $P > "$E2E_OUT/src16-run1.log" 2>&1; RC=$?
metric run_unreadable_exit "$RC"
check run1-commits-with-exit-3 test "$RC" = 3
check run1-log-names-the-file grep -q "not read .*$SRC/share/secret" "$E2E_OUT/src16-run1.log"
check run1-log-names-the-foreign-mount grep -q "skipping $SRC/attacker/mnt: a fuse.sshfs mount of user" "$E2E_OUT/src16-run1.log"
UNREAD=$(json "d['unread_files']"); echo "status --json unread_files: $UNREAD"
check status-lists-the-file test "$UNREAD" = "['$SRC/share/secret']"

# ---------------------------------------------------------------- (c) sparse files
A0=$(alloc_bytes "$SERVER_DIR/$P.luks")
AS truncate -s 320M "$SRC/attacker/sparse320m"
AS truncate -s 4G "$SRC/attacker/sparse4g"
T0=$(_uptime)
E2E run $P > "$E2E_OUT/src16-run2.log" 2>&1; RC=$?
metric run_sparse_seconds "$(awk -v a="$T0" -v b="$(_uptime)" 'BEGIN{printf "%.1f", b-a}')"
A1=$(alloc_bytes "$SERVER_DIR/$P.luks")
metric run_sparse_exit "$RC"
metric sparse_320m_server_growth_bytes $((A1 - A0))
check run2-exit-3 test "$RC" = 3
check sparse-costs-under-4MiB test $((A1 - A0)) -lt $((4 << 20))
check run2-names-the-skipped-file grep -q "larger than backup.max_file_size 3G.*: $SRC/attacker/sparse4g" "$E2E_OUT/src16-run2.log"
SKIPPED=$(json "d['skipped_large_files']"); echo "status --json skipped_large_files: $SKIPPED"
check status-lists-the-skipped-file test "$SKIPPED" = "['$SRC/attacker/sparse4g']"
DATA_SNAP=$(json "d['snapshot']")
check status-names-the-snapshot test -n "$DATA_SNAP"
echo "the last snapshot with $MNT's data: $DATA_SNAP"

# ---------------------------------------------------------------- (a) the disk is gone
umount "$MNT"
E2E run $P > "$E2E_OUT/src16-run3.log" 2>&1; RC=$?
metric run_unmounted_require_mount_exit "$RC"
check run3-refused-exit-1 test "$RC" = 1
check run3-says-not-mounted grep -q "$MNT must be a mount point" "$E2E_OUT/src16-run3.log"
sed -i '/require_mount:/d' "$PROFILE"
E2E run $P > "$E2E_OUT/src16-run4.log" 2>&1; RC=$?
metric run_unmounted_emptied_exit "$RC"
check run4-refused-exit-1 test "$RC" = 1
check run4-says-empty grep -q "backup source $MNT is empty, but the previous snapshot $DATA_SNAP" "$E2E_OUT/src16-run4.log"
for r in 5 6; do
  E2E run --allow-shrink $P > "$E2E_OUT/src16-run$r.log" 2>&1; RC=$?
  metric run_allow_shrink_${r}_exit "$RC"
  check run$r-allow-shrink-commits test "$RC" = 3
done
check run6-kept-the-data-snapshot grep -q "keeping snapshot $DATA_SNAP" "$E2E_OUT/src16-run6.log"
E2E snapshots $P --json > "$E2E_OUT/src16-snapshots.json"
cat "$E2E_OUT/src16-snapshots.json"
check data-snapshot-still-there python3 -c "
import json; ids=[s['id'] for s in json.load(open('$E2E_OUT/src16-snapshots.json'))]
print(ids); assert '$DATA_SNAP' in ids and len(ids) == 3, ids"

# ---------------------------------------------------------------- (d)
fusermount3 -u "$SRC/attacker/mnt" || umount "$SRC/attacker/mnt"
fusermount3 -u "$SRC/share" || umount "$SRC/share"
cp -a /var/tmp/authorized_keys.src16 "$AUTH"; chmod "${FUSEMODE:-600}" /dev/fuse
rm -rf /var/tmp/attacker16 /var/tmp/authorized_keys.src16 "$IMG" /home/backupuser/share16
for i in $(seq 1 50); do pgrep -x sshfs >/dev/null || pgrep -x ssh >/dev/null || break; sleep 0.1; done
check victim-unchanged test "$VICTIM0" = "$(victim_sum)"
check no-leftovers assert_no_leftovers
rm -rf /srv/src16
