#!/bin/bash
# timeout: 1500
# Tuning experiment (not part of the CI set): sequential read speed out of the container
# (what restore does) for several read-ahead sizes on the dm-crypt device. Reads go
# ext4 -> dm-crypt -> direct-I/O loop -> sshfs -> ssh: every read-ahead window is split
# into requests that can travel the SSH connection together instead of one after another.
#   vm-tests/run.sh vm-tests/bench/readahead.sh    (BENCH_RA_MIB: data size, default 48)
source "$(dirname "$0")/../lib/common.sh"
P=ra
SRC=/srv/ra-data
MNT=/run/ra-mnt
MIB=${BENCH_RA_MIB:-48}
mk() {
  mkdir -p $SRC
  for i in $(seq 1 $((MIB / 4))); do head -c 4M /dev/urandom > $SRC/f$i; done
}
check profile scenario_profile $P 512M "$SRC"
check data mk
check init "$E2E_BIN" init $P
check run "$E2E_BIN" run $P
mkdir -p $MNT
check mount "$E2E_BIN" mount $P $MNT
# The mapping's queue, found by device number (without udev /dev/mapper/* are plain nodes).
m=$(ls /dev/mapper/* | grep -v control | head -1)
RA=/sys/dev/block/$((16#$(stat -c %t "$m"))):$((16#$(stat -c %T "$m")))/queue/read_ahead_kb
echo "dm device: $m (default read_ahead_kb $(cat "$RA"))"
snap=$(ls $MNT | head -1)
for ra in 128 512 2048 8192 128 2048; do
  echo $ra > "$RA" || fail "setting read_ahead_kb $ra"
  sync; echo 3 > /proc/sys/vm/drop_caches
  a=$(_uptime)
  check "read-ra$ra" bash -c "cat $MNT/$snap$SRC/* > /dev/null"
  b=$(_uptime)
  metric "read_${MIB}MiB_ra${ra}KiB_s" "$(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.1f", b-a}')"
done
check umount "$E2E_BIN" umount $P
check no-leftovers assert_no_leftovers
