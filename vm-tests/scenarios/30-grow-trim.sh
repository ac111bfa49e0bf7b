#!/bin/bash
# timeout: 1200
# Issue 5: grow (offline, online, interrupted and re-run) keeps data identical and df shows
# the new size; trim through nbdkit over an SSH tunnel gives deleted space back to the server;
# nothing is left behind, also when trim is killed midway.
source "$(dirname "$0")/../lib/common.sh"

P=gt
PROFILE=/etc/e2ebackup/profiles/$P.yaml
SRC=/srv/gt-data
C=$SERVER_DIR/gt.luks
E2E() { "$E2E_BIN" "$@"; }

make_profile() {
  scenario_profile $P 512M "$SRC" "  keep_last: 1"
  rm -rf "$SRC"; mkdir -p "$SRC"
  for i in $(seq 1 30); do head -c $((i * 20000)) /dev/urandom > "$SRC/f$i"; done
}
L=""
open_hand() {
  L=$(losetup -f --show --read-only --direct-io=on "$C") &&
  cryptsetup open --readonly --key-file "$DEMO_DIR/gt.key" "$L" gtview && mkdir -p /mnt/gt && mount -o ro /dev/mapper/gtview /mnt/gt
}
close_hand() { umount /mnt/gt; cryptsetup close gtview; losetup -d "$L"; }
fs_size() { df -B1 --output=size /mnt/gt | tail -1 | tr -d ' '; }
data_identical() {
  local s; s=$(ls /mnt/gt/snapshots | tail -1)
  [ -z "$(rsync -aHc --numeric-ids --dry-run --itemize-changes --delete "$SRC/" "/mnt/gt/snapshots/$s$SRC/")" ] && e2fsck -fn /dev/mapper/gtview >/dev/null
}
grown_to() { # grown_to MIB: df within 5% below MIB (ext4 overhead) and data intact
  open_hand || return 1
  local sz; sz=$(fs_size); echo "fs size $sz bytes"
  local ok=0; [ "$sz" -gt $(( $1 * 1024 * 1024 * 93 / 100 )) ] && [ "$sz" -le $(( $1 * 1024 * 1024 )) ] && data_identical && ok=1
  close_hand; [ $ok = 1 ]
}

check setup make_profile
check init E2E init $P
check run E2E run $P

# ---------------------------------------------------------------- grow
check grow-offline E2E grow $P --size 768M
check offline-grown-data-identical grown_to 768
check grow-refuses-shrink bash -c "$E2E_BIN grow $P --size 256M; [ \$? = 2 ]"
check grow-online E2E grow $P --size +256M --online
check online-grown-data-identical grown_to 1024
"$E2E_BIN" grow $P --size 1280M > "$E2E_OUT/grow-killed.log" 2>&1 &
GPID=$!
for i in $(seq 1 300); do grep -q enlarging "$E2E_OUT/grow-killed.log" && break; sleep 0.1; done
sleep 1; kill -9 $GPID; wait $GPID 2>/dev/null
check grow-was-interrupted grep -q enlarging "$E2E_OUT/grow-killed.log"
check grow-rerun-completes E2E grow $P --size 1280M
check rerun-grown-data-identical grown_to 1280
check no-leftovers-after-grow assert_no_leftovers

# auto_grow during run: a threshold above the filesystem size makes the next run grow by one
# step, up to max_size; at max_size a run only warns.
check auto-grow-profile sed -i "s#^  keyfile: .*#&\n  auto_grow: {when_free_below: 2000M, step: 64M, max_size: 1344M}#" "$PROFILE"
check run-auto-grows bash -c "$E2E_BIN run $P > $E2E_OUT/auto-grow.log 2>&1 && grep 'auto_grow: .* growing the container to 1344M' $E2E_OUT/auto-grow.log"
check auto-grown-data-identical grown_to 1344
check run-at-max-size-warns bash -c "$E2E_BIN run $P > $E2E_OUT/auto-grow2.log 2>&1 && grep 'at its auto_grow.max_size 1344M' $E2E_OUT/auto-grow2.log"

# ---------------------------------------------------------------- trim
head -c 48M /dev/urandom > "$SRC/big"
check run-with-big-file E2E run $P
sync; WITH=$(alloc_bytes "$C"); metric alloc_with_48M_file "$WITH"
rm "$SRC/big"
check run-without-big-file-prunes-old E2E run $P
sync; BEFORE=$(alloc_bytes "$C"); metric alloc_after_delete_before_trim "$BEFORE"
check trim E2E trim $P
sync; AFTER=$(alloc_bytes "$C"); metric alloc_after_trim "$AFTER"
metric trim_gave_back_bytes $((BEFORE - AFTER))
check trim-gives-back-90pct test $((BEFORE - AFTER)) -ge $(( 48 * 1024 * 1024 * 90 / 100 ))
check no-leftovers-after-trim assert_no_leftovers
open_hand && { check data-intact-after-trim data_identical; close_hand; }

"$E2E_BIN" trim $P > "$E2E_OUT/trim-killed.log" 2>&1 &
TPID=$!
# Killed the moment the NBD device is connected: on a small container the whole trim after
# that takes about 2 s, so a separate check before the kill can see it finished already.
reached=no
for i in $(seq 1 600); do
  if ls /sys/block/nbd*/pid >/dev/null 2>&1; then kill -9 $TPID; reached=yes; break; fi
  sleep 0.1
done
kill -9 $TPID 2>/dev/null; wait $TPID 2>/dev/null
check trim-reached-nbd test "$reached" = yes
check cleanup-after-killed-trim E2E cleanup $P
sleep 1
check no-leftovers-after-killed-trim assert_no_leftovers
