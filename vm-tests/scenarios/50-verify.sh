#!/bin/bash
# timeout: 900
# Issue 6 (verify): a byte flipped inside a file's data on the server is reported by
# `verify`, naming that file (exit 6); an untouched container verifies clean.
source "$(dirname "$0")/../lib/common.sh"

P=ver
C=$SERVER_DIR/ver.luks
SRC=/srv/ver-data
E2E() { "$E2E_BIN" "$@"; }
setup() {
  scenario_profile $P 256M "$SRC"
  mkdir -p "$SRC/docs"
  for i in 1 2 3 4 5; do head -c 200000 /dev/urandom > "$SRC/docs/file$i"; done
  head -c 1M /dev/urandom > "$SRC/docs/victim.bin"
}
# Where does victim.bin's first data block live in the container file?
# container offset = LUKS2 data offset + ext4 physical block * 4096
victim_offset() {
  local L off blk
  L=$(losetup -f --show --read-only "$C") || return 1
  cryptsetup open --readonly --header "$DEMO_DIR/ver.key.header" --key-file "$DEMO_DIR/ver.key" "$L" verview || return 1
  mkdir -p /mnt/ver && mount -o ro /dev/mapper/verview /mnt/ver
  blk=$(filefrag -v -b4096 /mnt/ver/snapshots/*"$SRC/docs/victim.bin" | awk '$1=="0:"{gsub(/\.\./," ");split($4,a," ");print a[1]; exit}')
  off=$(cryptsetup luksDump "$DEMO_DIR/ver.key.header" | awk '/offset:/ && /bytes/ {print $2; exit}')
  umount /mnt/ver; cryptsetup close verview; losetup -d "$L"
  [ -n "$blk" ] && [ -n "$off" ] || return 1
  echo $(( off + blk * 4096 + 123 ))
}
flip_at() { # flip one byte of the server's container file at offset $1
  local b; b=$(dd if="$C" bs=1 skip="$1" count=1 2>/dev/null | od -An -tu1 | tr -d ' ')
  printf "\\$(printf '%03o' $(( (b ^ 1) & 255 )))" | dd of="$C" bs=1 seek="$1" conv=notrunc 2>/dev/null
}

check setup setup
check init E2E init $P
check run E2E run $P
check verify-clean E2E verify $P
check verify-subset E2E verify $P --read-data 30
OFF=$(victim_offset); echo "victim.bin data at container offset $OFF"
check found-victim-block test -n "$OFF"
check flip-byte flip_at "$OFF"
check verify-names-victim bash -c "$E2E_BIN verify $P 2>&1 | tee /dev/stderr | grep -q 'victim.bin: content differs'; [ \${PIPESTATUS[0]} = 6 ]"
check only-victim-named bash -c "[ \$($E2E_BIN verify $P 2>&1 | grep -c 'DIFFERS: ') = 1 ]"
check no-leftovers assert_no_leftovers
