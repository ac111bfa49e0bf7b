#!/bin/bash
# timeout: 900
# Issue 6: a server that changes the container's LUKS2 header is refused with exit 6 before
# anything is opened; the client's pinned copy still opens the data and repairs the server's
# copy. A server that hands back an older copy of the container is refused with exit 6 too
# (authenticated generation counter), until the user accepts it deliberately.
source "$(dirname "$0")/../lib/common.sh"

P=tamper
C=$SERVER_DIR/tamper.luks
SRC=/srv/tamper-data
E2E() { "$E2E_BIN" "$@"; }
make_profile() {
  scenario_profile $P 256M "$SRC"
  mkdir -p "$SRC"; echo "precious" > "$SRC/file"
}
flip_header_byte() { # one byte inside the JSON area of the first header copy
  local b; b=$(dd if="$C" bs=1 skip=5000 count=1 2>/dev/null | od -An -tu1 | tr -d ' ')
  printf "\\$(printf '%03o' $(( (b ^ 32) & 255 )))" | dd of="$C" bs=1 seek=5000 conv=notrunc 2>/dev/null
}
open_with_pinned() {
  local L; L=$(losetup -f --show --read-only "$C") || return 1
  cryptsetup open --readonly --header "$DEMO_DIR/tamper.key.header" --key-file "$DEMO_DIR/tamper.key" "$L" pinned &&
  mkdir -p /mnt/pinned && mount -o ro /dev/mapper/pinned /mnt/pinned &&
  grep -q precious /mnt/pinned/snapshots/*"$SRC/file"
  local r=$?
  umount /mnt/pinned 2>/dev/null; cryptsetup close pinned 2>/dev/null; losetup -d "$L"
  return $r
}

check setup make_profile
check init E2E init $P
check run E2E run $P
check tamper-header flip_header_byte
check tampered-header-exits-6 bash -c "$E2E_BIN run $P 2>&1 | tee /dev/stderr | grep -q 'differs from the pinned copy'; [ \${PIPESTATUS[0]} = 6 ]"
check no-leftovers-after-refusal assert_no_leftovers
check pinned-copy-still-opens-data open_with_pinned
check repair-with-pinned-copy cryptsetup luksHeaderRestore -q --header-backup-file "$DEMO_DIR/tamper.key.header" "$C"
check run-after-repair E2E run $P

# Rollback/replay: the server hands back an older copy of the whole container.
check keep-old-copy cp --sparse=always "$C" /srv/tamper-old.luks
echo "newer" > "$SRC/file2"
check run-newer E2E run $P
check replace-with-old-copy bash -c "cp --sparse=always /srv/tamper-old.luks $C && chown backupuser: $C"
check rollback-exits-6 bash -c "$E2E_BIN run $P 2>&1 | tee /dev/stderr | grep -q OLDER; [ \${PIPESTATUS[0]} = 6 ]"
check no-leftovers-after-rollback-refusal assert_no_leftovers
check accept-rollback E2E accept-rollback $P
check run-after-accept E2E run $P
check final-no-leftovers assert_no_leftovers
