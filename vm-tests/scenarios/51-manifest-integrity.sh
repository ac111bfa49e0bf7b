#!/bin/bash
# timeout: 900
# Issue 27 item 3 and issue 29 item 3: manifests hold hashes taken on the client, and
# `restore` checks every file it wrote against them. (a) A byte of a file's data flipped on
# the server (as backupuser) after its hash was taken: `restore` exits 6 naming the file;
# `--no-check` restores. (b) The hard-link swap: A and B one inode, then B replaced by an
# identical independent copy (same mode and times); after the next run and a restore, A and
# B are two files, while a true link pair stays a pair. (c) Nothing left mounted.
# Issue 29 item 8: `recover-key --force` twice tests the key against the container and
# keeps both earlier keyfiles (.old, .old.1).
source "$(dirname "$0")/../lib/common.sh"

P=mi
C=$SERVER_DIR/mi.luks
SRC=/srv/mi-data
OUT=/srv/mi-restore
E2E() { "$E2E_BIN" "$@"; }
OFFLINE=/root/mi-offline
setup() {
  mkdir -p "$OFFLINE"
  ssh-keygen -q -t ed25519 -N '' -C mi-recovery -f "$OFFLINE/id_ed25519"
  scenario_profile $P 128M "$SRC"
  sed -i "s#^  keyfile: .*#&\n  recovery_recipients: [\"$(cat "$OFFLINE/id_ed25519.pub")\"]#" /etc/e2ebackup/profiles/$P.yaml
  mkdir -p "$SRC/docs" "$SRC/swap" "$SRC/pair"
  for i in 1 2 3; do head -c 50000 /dev/urandom > "$SRC/docs/file$i"; done
  head -c 256K /dev/urandom > "$SRC/docs/victim.bin"
  echo "one inode in the source, then two" > "$SRC/swap/a"; ln "$SRC/swap/a" "$SRC/swap/b"
  echo "a true pair" > "$SRC/pair/a"; ln "$SRC/pair/a" "$SRC/pair/b"
}
# B becomes an independent copy of A: same content, mode, owner and times.
swap_b() { cp -p "$SRC/swap/a" "$SRC/swap/b.new" && mv "$SRC/swap/b.new" "$SRC/swap/b" &&
  [ "$(stat -c %h "$SRC/swap/a")" = 1 ]; }
# Where does victim.bin's first data block live in the container file?
# container offset = LUKS2 data offset + ext4 physical block * 4096
victim_offset() {
  local L off blk
  L=$(losetup -f --show --read-only "$C") || return 1
  cryptsetup open --readonly --header "$DEMO_DIR/$P.key.header" --key-file "$DEMO_DIR/$P.key" "$L" miview || return 1
  mkdir -p /mnt/mi && mount -o ro /dev/mapper/miview /mnt/mi
  blk=$(filefrag -v -b4096 /mnt/mi/snapshots/*"$SRC/docs/victim.bin" | awk '$1=="0:"{gsub(/\.\./," ");split($4,a," ");print a[1]; exit}')
  off=$(cryptsetup luksDump "$DEMO_DIR/$P.key.header" | awk '/offset:/ && /bytes/ {print $2; exit}')
  umount /mnt/mi; cryptsetup close miview; losetup -d "$L"
  [ -n "$blk" ] && [ -n "$off" ] || return 1
  echo $(( off + blk * 4096 + 321 ))
}
# The attack, as the server user: flip one byte of the container file at offset $1.
flip_raw() { # FILE OFFSET
  local b; b=$(dd if="$1" bs=1 skip="$2" count=1 2>/dev/null | od -An -tu1 | tr -d ' ')
  printf "\\$(printf '%03o' $(( (b ^ 1) & 255 )))" | dd of="$1" bs=1 seek="$2" conv=notrunc 2>/dev/null
}
flip_at() { su -s /bin/bash backupuser -c "$(declare -f flip_raw); flip_raw $C $1"; }
links() { stat -c %h "$1"; }
ino() { stat -c %i "$1"; }

check setup setup
check init E2E init $P
check run-1 E2E run $P
check swap-b swap_b
T0=$(_uptime)
check run-2-copies-again bash -c "$E2E_BIN run $P 2>&1 | tee /dev/stderr | grep -q 'copied again'; [ \${PIPESTATUS[0]} = 0 ]"
metric run_2_s "$(awk -v a="$T0" -v b="$(_uptime)" 'BEGIN{printf "%.1f", b-a}')"
T0=$(_uptime)
check restore-checked bash -c "$E2E_BIN restore $P latest $OUT/full 2>&1 | tee /dev/stderr | grep -q 'checked [0-9]* restored file'; [ \${PIPESTATUS[0]} = 0 ]"
metric restore_checked_s "$(awk -v a="$T0" -v b="$(_uptime)" 'BEGIN{printf "%.1f", b-a}')"
R=$OUT/full$SRC
check swap-a-single test "$(links "$R/swap/a")" = 1
check swap-b-single test "$(links "$R/swap/b")" = 1
check swap-two-inodes test "$(ino "$R/swap/a")" != "$(ino "$R/swap/b")"
check pair-stays-a-pair test "$(ino "$R/pair/a")" = "$(ino "$R/pair/b")"
check pair-two-links test "$(links "$R/pair/a")" = 2
check restored-victim-intact cmp "$SRC/docs/victim.bin" "$R/docs/victim.bin"

OFF=$(victim_offset); echo "victim.bin data at container offset $OFF"
check found-victim-block test -n "$OFF"
check flip-byte-as-server flip_at "$OFF"
check restore-exits-6-naming-victim bash -c "$E2E_BIN restore $P latest $OUT/bad > /tmp/mi-bad.log 2>&1; rc=\$?; cat /tmp/mi-bad.log; [ \$rc = 6 ] && grep -q 'DIFFERS: .*docs/victim.bin: content differs' /tmp/mi-bad.log"
check only-victim-named test "$(grep -c 'DIFFERS: ' /tmp/mi-bad.log)" = 1
check no-check-restores E2E restore $P latest $OUT/nocheck --no-check
check no-check-copy-differs bash -c "! cmp -s $SRC/docs/victim.bin $OUT/nocheck$SRC/docs/victim.bin"
K=$DEMO_DIR/$P.key
check recover-key-twice bash -c "cp $K /root/mi.key.before && $E2E_BIN recover-key $P --identity $OFFLINE/id_ed25519 --force 2>&1 | tee /dev/stderr | grep -q 'recovered key opens keyslot' && $E2E_BIN recover-key $P --identity $OFFLINE/id_ed25519 --force"
check both-old-keys-kept bash -c "cmp /root/mi.key.before $K.old && cmp /root/mi.key.before $K.old.1 && cmp /root/mi.key.before $K"
check no-leftovers assert_no_leftovers
