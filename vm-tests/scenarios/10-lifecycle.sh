#!/bin/bash
# timeout: 900
# Issue 3: profile, init, run, teardown that never leaves a mess, against the guest's sshd
# with real sshfs, loop (direct I/O), dm-crypt/LUKS2, ext4 and rsync.
source "$(dirname "$0")/../lib/common.sh"

P=demo
PROFILE=/etc/e2ebackup/profiles/$P.yaml
DATA=/srv/demo-data
FS=/run/e2ebackup/$P/fs
E2E() { "$E2E_BIN" "$@"; }

setup() {
  install -D -m 0600 "$E2E_REPO/profiles/demo.yaml" "$PROFILE"
  rm -rf "$DATA"; mkdir -p "$DATA/alice/.cache" "$DATA/bob/docs" "$DATA/empty"
  local i
  for i in $(seq 1 40); do head -c $((i * 1500)) /dev/urandom > "$DATA/alice/file$i.bin"; done
  echo "hello" > "$DATA/bob/docs/readme.txt"
  ln "$DATA/bob/docs/readme.txt" "$DATA/bob/docs/hardlink.txt"
  ln -s ../docs/readme.txt "$DATA/bob/link"
  echo junk > "$DATA/alice/scratch.tmp"; echo cached > "$DATA/alice/.cache/c"
  chown 1234:5678 "$DATA/alice/file1.bin"
}

# Open the container by hand, as docs/layout.md tells a person to (server-side file here).
open_by_hand() {
  MANUAL_LOOP=$(losetup -f --show --read-only --direct-io=on "$SERVER_DIR/demo.luks") &&
  cryptsetup open --readonly --key-file "$DEMO_DIR/container.key" "$MANUAL_LOOP" manual &&
  mkdir -p /mnt/manual && mount -o ro /dev/mapper/manual /mnt/manual
}
close_by_hand() {
  umount /mnt/manual; cryptsetup close manual; losetup -d "$MANUAL_LOOP"
}
snap_count() { ls "$1/snapshots" | wc -l; }

wait_for_rsync() { # wait until an rsync runs (the run reached the copy), up to 120 s
  local i; for i in $(seq 1 600); do pgrep -x rsync >/dev/null && return 0; sleep 0.2; done; return 1; }

# ---------------------------------------------------------------- init and two runs
check setup setup
check validate E2E validate $P
check init E2E init $P
check container-created test -s "$SERVER_DIR/demo.luks"
check no-init-partial-left test ! -e "$SERVER_DIR/demo.luks.init-partial"
check keyfile-0400 test "$(stat -c %a "$DEMO_DIR/container.key")" = 400
check header-backup test -s "$DEMO_DIR/container.key.header"
metric init_server_alloc_bytes "$(alloc_bytes "$SERVER_DIR/demo.luks")"
check init-refuses-overwrite bash -c "! $E2E_BIN init $P"
check no-leftovers-after-init assert_no_leftovers

check run-1 E2E run $P
echo "changed" >> "$DATA/alice/file5.bin"; rm "$DATA/alice/file6.bin"; echo new > "$DATA/bob/new.txt"
check run-2 E2E run $P
check no-leftovers-after-runs assert_no_leftovers
metric after_two_runs_server_alloc_bytes "$(alloc_bytes "$SERVER_DIR/demo.luks")"

check open-by-hand open_by_hand
S1=$(ls /mnt/manual/snapshots | sed -n 1p); S2=$(ls /mnt/manual/snapshots | sed -n 2p)
check two-snapshots test "$(snap_count /mnt/manual)" = 2
check unchanged-shares-inode test "$(stat -c %i "/mnt/manual/snapshots/$S1$DATA/alice/file7.bin")" = "$(stat -c %i "/mnt/manual/snapshots/$S2$DATA/alice/file7.bin")"
check changed-is-new-inode test "$(stat -c %i "/mnt/manual/snapshots/$S1$DATA/alice/file5.bin")" != "$(stat -c %i "/mnt/manual/snapshots/$S2$DATA/alice/file5.bin")"
check deleted-absent test ! -e "/mnt/manual/snapshots/$S2$DATA/alice/file6.bin"
check excludes-applied test ! -e "/mnt/manual/snapshots/$S2$DATA/alice/scratch.tmp" -a ! -e "/mnt/manual/snapshots/$S2$DATA/alice/.cache/c"
check byte-identical bash -c "[ -z \"\$(rsync -aHc --numeric-ids --dry-run --itemize-changes --exclude='*.tmp' --exclude=/alice/.cache $DATA/ /mnt/manual/snapshots/$S2$DATA/)\" ]"
check owner-kept test "$(stat -c %u:%g "/mnt/manual/snapshots/$S2$DATA/alice/file1.bin")" = 1234:5678
check hardlink-kept test "$(stat -c %h "/mnt/manual/snapshots/$S2$DATA/bob/docs/readme.txt")" -ge 2
check close-by-hand close_by_hand
check no-leftovers-after-manual assert_no_leftovers

# ---------------------------------------------------------------- SIGKILL during rsync
head -c 40M /dev/urandom > "$DATA/big.bin"
"$E2E_BIN" run $P > "$E2E_OUT/kill9-run.log" 2>&1 &
PID=$!
check kill9-reached-rsync wait_for_rsync
sleep 2
kill -9 $PID; wait $PID 2>/dev/null
sleep 1
check kill9-rsync-died-with-it bash -c '! pgrep -x rsync'
check kill9-journal-left test -s /run/e2ebackup/$P/undo.json
check kill9-no-complete-snapshot test "$(snap_count "$FS")" = 2
check run-after-kill9 E2E run $P
check run-after-kill9-no-leftovers assert_no_leftovers
check open-after-kill9 open_by_hand
check three-snapshots test "$(snap_count /mnt/manual)" = 3
check no-partial-left test -z "$(ls -A /mnt/manual/.partial)"
check close-after-kill9 close_by_hand

# ---------------------------------------------------------------- SIGTERM, and a concurrent run
head -c 40M /dev/urandom > "$DATA/big.bin"
"$E2E_BIN" run $P > "$E2E_OUT/sigterm-run.log" 2>&1 &
PID=$!
check sigterm-reached-rsync wait_for_rsync
check concurrent-run-exits-4 bash -c "$E2E_BIN run $P; [ \$? = 4 ]"
# No key bytes in any process's argv or environment while a run is in progress.
check no-key-in-proc python3 - "$DEMO_DIR/container.key" <<'PY'
import glob, sys
key = open(sys.argv[1], "rb").read()
chunks = [key[i:i + 16] for i in range(0, len(key) - 16, 16)]
for f in glob.glob("/proc/[0-9]*/cmdline") + glob.glob("/proc/[0-9]*/environ"):
    try:
        data = open(f, "rb").read()
    except OSError:
        continue
    if any(c in data for c in chunks):
        sys.exit(f"key material in {f}")
PY
kill -TERM $PID; wait $PID; RC=$?
check sigterm-exits-130 test "$RC" = 130
check sigterm-no-leftovers assert_no_leftovers
check sigterm-status-recorded grep -q '"exit_code": 130' /var/lib/e2ebackup/$P/last-run.json

# ---------------------------------------------------------------- changed host key, typo
server_rotate_hostkey
check changed-host-key-exits-6 bash -c "$E2E_BIN run $P; [ \$? = 6 ]"
check changed-host-key-no-leftovers assert_no_leftovers
server_restore_hostkey
sed 's/^  host:/  hots:/' "$PROFILE" > /etc/e2ebackup/profiles/typo.yaml
chmod 0600 /etc/e2ebackup/profiles/typo.yaml
check typo-exits-2-naming-line bash -c "$E2E_BIN validate typo 2>&1 | tee /dev/stderr | grep -q 'line 4'; [ \${PIPESTATUS[0]} = 2 ]"
check status-runs E2E status $P
check no-key-in-output python3 - "$DEMO_DIR/container.key" "$E2E_OUT" <<'PY'
import glob, sys
key = open(sys.argv[1], "rb").read()
chunks = [key[i:i + 16] for i in range(0, len(key) - 16, 16)]
for f in glob.glob(sys.argv[2] + "/*.log") + glob.glob("/var/lib/e2ebackup/*/*"):
    data = open(f, "rb").read()
    if any(c in data for c in chunks):
        sys.exit(f"key material in {f}")
PY
check final-no-leftovers assert_no_leftovers
