#!/bin/bash
# timeout: 1800
# Issues 28 (resume) and 29 item 6 (a full container grows): a backup that cannot finish in
# one go is continued by the next run, not started again.
# - A first backup of 48 MiB (incompressible) is cut by `kill -9` of the run (and its rsync)
#   once rsync has written half of the files; a source file is deleted; the next run
#   resumes: the server's disk writes (/sys/block/vda/stat, the server's own disk) during it
#   are at most 60% of the data set.
# - 48 MiB more is added and that run is cut by a dropped link (the sshfs process killed)
#   once rsync has written 29 of its 48 files (what had not reached the server, up to the
#   write-behind's 4 MiB, is lost); the next run resumes it, again at
#   most 60% of the new data written on the server. (The container file's allocation is no
#   measure of progress: ext4 reuses blocks an earlier attempt freed.)
# The run cut by the dropped link copies at backup.bwlimit 1M, slower than the link, so that
# rsync cannot run ahead of it into memory (with 2 GiB of RAM it would copy all 48 MiB before
# the cut). Not a dirty-page limit (vm.dirty_bytes): it is global, so it throttled the
# guest's own sftp-server too, which the client's dirty pages were waiting for, and a run
# could stall until the watchdog gave up (seen once in a CI rehearsal).
# - Both snapshots equal the source (rsync -naHAXci prints nothing), the deleted file is
#   absent, `verify` is clean, nothing is left behind.
# - A 64M container with auto_grow gets the same source: the run fills it (ENOSPC inside the
#   container, exit 1, said so; the 95 MiB of both source directories do not fit in it); the next run grows it because of that failure (by what it
#   needed), resumes, and commits.
source "$(dirname "$0")/../lib/common.sh"

P=resume
PF=resumefull
C=$SERVER_DIR/$P.luks
SRC=/var/tmp/resume-src
E2E() { "$E2E_BIN" "$@"; }
LOG=$E2E_OUT/15-resume
MIB=$((1 << 20))

setup() {
  rm -rf "$SRC"; mkdir -p "$SRC/first"
  local i; for i in $(seq -w 1 48); do head -c $MIB /dev/urandom > "$SRC/first/f$i"; done
  scenario_profile $P 512M "$SRC"
}
written() { awk '{print $7 * 512}' /sys/block/vda/stat; }   # bytes written to the server's disk
ids() { "$E2E_BIN" snapshots "$1" 2>/dev/null | grep -oE '[0-9]{8}T[0-9]{6}Z' | sort -u; }

# cut_run HOW DIR N: start `run`, and once rsync has written N files of DIR (client side, in
# the partial snapshot), cut it: HOW=kill: SIGKILL the run and its rsync (what the kernel
# holds still reaches the server); HOW=link: SIGKILL its sshfs (what had not reached the
# server is lost).
files_in() { ls /run/e2ebackup/$P/fs/.partial/*/"$SRC/$1" 2>/dev/null | grep -c '^[fm][0-9]*$'; }
reached() { [ "$(files_in "$2")" -ge "$3" ]; }
PROFILE=/etc/e2ebackup/profiles/$P.yaml
cut_run() { # the link's run at backup.bwlimit 1M, whatever becomes of it
  [ "$1" = link ] && sed -i "s#^  sources: .*#&\n  bwlimit: 1M#" "$PROFILE"
  cut_run_inner "$@"; local rc=$?
  sed -i '/^  bwlimit: 1M$/d' "$PROFILE"
  return $rc
}
cut_run_inner() {
  local how=$1 base i pid s=""
  base=$(alloc_bytes "$C")
  setsid "$E2E_BIN" run $P > "$LOG.cut-$how.log" 2>&1 &
  pid=$!
  [ "$how" = kill ] || for i in $(seq 1 600); do
    s=$(pgrep -x sshfs | while read -r q; do grep -qa "/run/e2ebackup/$P/" /proc/$q/cmdline && echo $q; done)
    [ -n "$s" ] && break; sleep 0.2
  done
  for i in $(seq 1 3000); do
    reached "$@" && break
    kill -0 $pid 2>/dev/null || { echo "the run ended before the cut"; cat "$LOG.cut-$how.log"; return 1; }
    sleep 0.1
  done
  local n; n=$(files_in "$2")
  if [ "$how" = kill ]; then
    kill -9 -- -$pid
  else
    [ -n "$s" ] || { echo "no sshfs of $P"; return 1; }
    kill -9 $s
  fi
  metric "cut_${how}_files_written_at_the_cut" "$n"
  metric "cut_${how}_server_bytes" $(( $(alloc_bytes "$C") - base ))
  wait $pid; local rc=$?; echo "the run exited $rc"; tail -3 "$LOG.cut-$how.log"
  if [ "$how" = link ]; then
    [ $rc != 0 ] || return 1
    [ $rc != 5 ] || E2E cleanup $P
  fi
}

# resumed_run NAME DATA: the next run, with the server's disk writes measured around it
# (everything still in flight flushed first); they must be at most 60% of DATA bytes.
resumed_run() {
  local name=$1 data=$2 w0 w1 rc
  sync; w0=$(written)
  E2E run $P > "$LOG.$name.log" 2>&1; rc=$?
  sync; w1=$(written)
  grep -E 'resum|snapshot .* committed' "$LOG.$name.log"
  metric "${name}_server_bytes_written" $((w1 - w0))
  metric "${name}_percent_of_data" $(( (w1 - w0) * 100 / data ))
  [ $rc = 0 ] && grep -q 'resuming an interrupted backup: ' "$LOG.$name.log" &&
    [ $(( (w1 - w0) * 100 )) -le $(( data * 60 )) ]
}

same() { # same SNAPSHOT-DIR SUBDIR: the snapshot's copy of $SRC/SUBDIR equals it
  local out; out=$(rsync -naHAXci --numeric-ids --delete "$SRC/$2/" "$1$SRC/$2/")
  [ -z "$out" ] || { echo "differences:"; echo "$out" | head -20; return 1; }
}
compare() {
  local a b ok=0
  a=$(ids $P | sed -n 1p); b=$(ids $P | sed -n 2p)
  [ -n "$a" ] && [ -n "$b" ] || { echo "snapshots: $(ids $P)"; return 1; }
  mkdir -p /mnt/resume && E2E mount $P /mnt/resume || return 1
  # The first snapshot predates more/ (and the source directory's new time): first/ only.
  same "/mnt/resume/$a" first && same "/mnt/resume/$b" "" &&
    [ ! -e "/mnt/resume/$a$SRC/first/f01" ] && [ ! -e "/mnt/resume/$b$SRC/first/f01" ] || ok=1
  E2E umount $P; return $ok
}

check setup setup
check init E2E init $P
# At full speed rsync writes several files between two looks: cut at 20 to stop at about
# half (the metric records how many there were).
check first-backup-cut-by-kill-9 cut_run kill first 20
rm "$SRC/first/f01"
check resume-after-kill resumed_run resume_after_kill $((48 * MIB))
mkdir -p "$SRC/more"
for i in $(seq -w 1 48); do head -c $MIB /dev/urandom > "$SRC/more/m$i"; done
check backup-cut-by-dropped-link cut_run link more 29
check resume-after-dropped-link resumed_run resume_after_link $((48 * MIB))
check snapshots-equal-source compare
check verify-clean E2E verify $P
check no-leftovers assert_no_leftovers

# A container too small for the source: ENOSPC inside it, then auto_grow by what it needed.
full_profile() {
  scenario_profile $PF 64M "$SRC"
  sed -i "s#^  keyfile: .*#&\n  auto_grow: {when_free_below: 1%, step: 16M, max_size: 512M}#" /etc/e2ebackup/profiles/$PF.yaml
}
fills() {
  E2E run $PF > "$LOG.full.log" 2>&1; local rc=$?
  tail -4 "$LOG.full.log"; echo "exit $rc"
  [ $rc = 1 ] && grep -q "container's filesystem is full" "$LOG.full.log" &&
    E2E status $PF | grep -E 'container full|interrupted'
}
grows() {
  E2E run $PF > "$LOG.grow.log" 2>&1; local rc=$?
  grep -E 'auto_grow|resum|committed|filesystem now' "$LOG.grow.log"; echo "exit $rc"
  [ $rc = 0 ] && grep -q 'auto_grow: the last run failed with the container' "$LOG.grow.log" &&
    grep -q 'resuming an interrupted backup: ' "$LOG.grow.log"
}
check full-profile full_profile
check full-init E2E init $PF
check run-fills-the-container fills
check next-run-grows-and-resumes grows
check full-verify-clean E2E verify $PF
check final-no-leftovers assert_no_leftovers
