#!/bin/bash
# timeout: 900
# Measurement (not part of the CI set): what `init` allocates on the server for 1G and 4G
# containers, against the target of at most 0.5 % of the size + 8 MiB (issue 16). Prints
# the allocation, the LUKS2 data offset and the ext4 journal size.
#   vm-tests/run.sh vm-tests/bench/init-alloc.sh
source "$(dirname "$0")/../lib/common.sh"
SRC=/srv/alloc-data
mkdir -p $SRC
measure() {
  local size=$1 p=alloc$1 bytes target
  scenario_profile $p "$size" "$SRC"
  "$E2E_BIN" init $p || return 1
  bytes=$(alloc_bytes "$SERVER_DIR/$p.luks")
  target=$(( $(stat -c %s "$SERVER_DIR/$p.luks") / 200 + (8 << 20) ))
  metric "init-alloc-$size.bytes" "$bytes"
  metric "init-alloc-$size.target" "$target"
  metric "init-alloc-$size.luks-data-offset" "$(cryptsetup luksDump "$DEMO_DIR/$p.key.header" | awk '/offset:/ && /bytes/ {print $2; exit}')"
  echo "init $size: $(( bytes >> 20 )) MiB allocated, target $(( target >> 20 )) MiB"
  [ "$bytes" -le "$target" ]
}
check init-1G measure 1G
check init-4G measure 4G
check no-leftovers assert_no_leftovers
