#!/bin/bash
# timeout: 900
# Issue 27 item 8 and 7 (profiles): paths that root writes through but a local user
# (`attacker`) controls.
# (a) the Prometheus textfile's directory belongs to the attacker, who plants links at the
#     textfile's name and at every name the old writer used (.NAME.PID.tmp for the next
#     pids) pointing at a root-owned victim file: a run leaves the victim unchanged;
# (b) the restore TARGET below the attacker's directory: refused without
#     --allow-untrusted-target (exit 6, before any connection); with it, the attacker swaps
#     TARGET for a link to a root-owned victim directory over and over during the restore:
#     the victim is unchanged and the restore went to a real directory of the attacker's
#     (the one held before the connect) or was refused;
# (c) the same swap during `mount`: the snapshots never appear over the victim; then the
#     attacker moves the mount's parent away and puts a link to the victim (where root has
#     a tmpfs mounted) in its place: `umount` removes our mount by its identity and leaves
#     the tmpfs alone;
# (d) a profile with mode 0644 is refused with exit 2, naming the chmod that fixes it;
# (e) nothing is left mounted or open.
source "$(dirname "$0")/../lib/common.sh"

P=hostpaths
SRC=/srv/hostpaths-data
HOMEA=/home/atk83
PROMDIR=/var/lib/e2e-prom83
PROM=$PROMDIR/e2ebackup-$P.prom
VICTIM=/var/lib/e2e-victim83.bin
VDIR=/var/lib/e2e-victim83.d
E2E() { "$E2E_BIN" "$@"; }
AS() { setpriv --reuid=attacker --regid=attacker --clear-groups "$@"; }

setup() {
  scenario_profile $P 256M "$SRC" "  keep_last: 2" &&
  printf 'monitoring:\n  prometheus_textfile: %s\n' "$PROM" >> /etc/e2ebackup/profiles/$P.yaml &&
  mkdir -p "$SRC/etc" && echo "restored-content" > "$SRC/etc/shadow" && head -c 64K /dev/urandom > "$SRC/blob" &&
  { id attacker >/dev/null 2>&1 || useradd -M -d /nonexistent -s /bin/sh attacker; } &&
  mkdir -p "$HOMEA" "$PROMDIR" && chown attacker: "$HOMEA" "$PROMDIR" && chmod 0755 "$HOMEA" "$PROMDIR" &&
  head -c 4096 /dev/urandom > "$VICTIM" && chmod 0644 "$VICTIM" &&
  mkdir -p "$VDIR/mnt" && echo "root's own" > "$VDIR/file" && chmod 0755 "$VDIR" &&
  mount -t tmpfs -o size=1M e2e-victim83 "$VDIR/mnt"
}
victim_sum() { echo "$(sha256sum < "$VICTIM" | cut -d' ' -f1) $(stat -c %s "$VICTIM")"; }
# The victim directory: names, sizes, modes, owners and content of everything in it.
vdir_sum() { (cd "$VDIR" && find . -xdev -printf '%p %s %m %u %y\n' | sort && cat file) | sha256sum | cut -d' ' -f1; }
mounts_under() { awk -v p="$1" 'index($2, p) == 1 {print $2}' /proc/mounts; }

check setup setup
VICTIM0=$(victim_sum); VDIR0=$(vdir_sum)
echo "victim before: $VICTIM0, victim dir $VDIR0"

# ---------------------------------------------------------------- (d) a loose profile
chmod 0644 /etc/e2ebackup/profiles/$P.yaml
"$E2E_BIN" validate $P > "$E2E_OUT/loose-profile.log" 2>&1; RC=$?
cat "$E2E_OUT/loose-profile.log"; metric loose_profile_exit "$RC"
check profile-0644-exits-2 test "$RC" = 2
check profile-0644-names-fix grep -q "chmod 0600 /etc/e2ebackup/profiles/$P.yaml" "$E2E_OUT/loose-profile.log"
chmod 0600 /etc/e2ebackup/profiles/$P.yaml

check init E2E init $P

# ---------------------------------------------------------------- (a) the textfile
# Links at the textfile's name and at the old writer's temporary names for the next pids.
AS python3 - "$PROMDIR" "$(basename "$PROM")" "$VICTIM" <<'PY'
import os, sys
d, name, victim = sys.argv[1:]
os.symlink(victim, os.path.join(d, name))
start = int(open("/proc/sys/kernel/ns_last_pid").read())
for pid in range(start, start + 3000):
    os.symlink(victim, os.path.join(d, ".%s.%d.tmp" % (name, pid)))
PY
metric planted_links "$(find "$PROMDIR" -type l | wc -l)"
"$E2E_BIN" run $P > "$E2E_OUT/run.log" 2>&1; RC=$?
metric run_exit "$RC"
check run-exits-0 test "$RC" = 0
check textfile-victim-unchanged test "$(victim_sum)" = "$VICTIM0"
check textfile-written-as-a-file bash -c "[ -f $PROM ] && [ ! -L $PROM ] && [ \"\$(stat -c %U:%a $PROM)\" = root:644 ] && grep -q '^e2ebackup_last_exit_code{profile=\"$P\"} 0' $PROM"
check textfile-no-temp-left bash -c "! find $PROMDIR -type f -name '.*' | grep -q ."

# ---------------------------------------------------------------- (b) the restore target
"$E2E_BIN" restore $P latest "$HOMEA/restore" > "$E2E_OUT/restore-untrusted.log" 2>&1; RC=$?
cat "$E2E_OUT/restore-untrusted.log"; metric restore_untrusted_exit "$RC"
check restore-untrusted-exits-6 test "$RC" = 6
check restore-untrusted-names-flag grep -q -- --allow-untrusted-target "$E2E_OUT/restore-untrusted.log"

# The attacker swaps NAME (a directory, with SUB in it) for a link to the victim directory
# and back, again and again, until told to stop, starting six seconds after e2ebackup did (a process start
# takes seconds under load): after it opened NAME, during the SSH connect and the mounts
# (tens of seconds). setpriv itself in the background ($! is the
# attacker's).
swapper() {
  setpriv --reuid=attacker --regid=attacker --clear-groups bash -c '
    cd "$1" || exit 1; n=0; sleep 6
    while [ ! -e stop ]; do
      n=$((n + 1))
      mv -T "$2" "real.$n" 2>/dev/null || rm -f "$2"
      ln -s "$3" "$2"; sleep 0.02
      rm -f "$2"; mkdir -p "$2/$4" 2>/dev/null; sleep 0.02
    done' x "$HOMEA" "$1" "$VDIR" "${2:-}" </dev/null >/dev/null 2>&1 &
  SWAP=$!
}
stop_swapper() { touch "$HOMEA/stop"; wait "$SWAP" 2>/dev/null; rm -f "$HOMEA/stop"; }
trap 'touch $HOMEA/stop 2>/dev/null' EXIT

swapper restore
"$E2E_BIN" restore $P latest "$HOMEA/restore" --allow-untrusted-target > "$E2E_OUT/restore-swapped.log" 2>&1; RC=$?
stop_swapper
cat "$E2E_OUT/restore-swapped.log"; metric restore_swapped_exit "$RC"
metric restore_swaps "$(ls -d "$HOMEA"/real.* 2>/dev/null | wc -l)"
check restore-swapped-victim-dir-unchanged test "$(vdir_sum)" = "$VDIR0"
check restore-swapped-victim-file-unchanged test "$(victim_sum)" = "$VICTIM0"
# Exit 0: the snapshot is in one of the attacker's real directories (the one held before
# the connect, renamed by the attacker since). Exit 6 or 2: refused (a link or a missing
# directory met at the open).
restored_where() {
  local found
  found=$(find "$HOMEA" -path "*$SRC/etc/shadow" -type f | xargs -r grep -lx restored-content)
  echo "restored: ${found:-nothing}"
  case "$RC" in
    0) [ -n "$found" ] ;;
    2|6) [ -z "$found" ] ;;
    *) false ;;
  esac
}
check restore-swapped-went-to-a-held-dir-or-refused restored_where
nothing_under() { [ -z "$(mounts_under "$1")" ]; }
check restore-nothing-mounted-after nothing_under /run/e2ebackup/$P/

# ---------------------------------------------------------------- (c) mount and umount
rm -rf "$HOMEA"/real.* "$HOMEA/restore"
AS mkdir -p "$HOMEA/p/mnt"
"$E2E_BIN" mount $P "$HOMEA/p/mnt" > "$E2E_OUT/mount-untrusted.log" 2>&1; RC=$?
metric mount_untrusted_exit "$RC"
check mount-untrusted-exits-6 test "$RC" = 6
swapper p mnt
"$E2E_BIN" mount $P "$HOMEA/p/mnt" --allow-untrusted-target > "$E2E_OUT/mount-swapped.log" 2>&1; MRC=$?
stop_swapper
cat "$E2E_OUT/mount-swapped.log"; metric mount_swapped_exit "$MRC"
grep -E " $HOMEA| $VDIR" /proc/mounts | tee "$E2E_OUT/mounts-after-mount.txt"
only_the_tmpfs_on_victim() {
  [ "$(mounts_under "$VDIR")" = "$VDIR/mnt" ] && [ "$(findmnt -n -o FSTYPE "$VDIR/mnt")" = tmpfs ]
}
check mount-not-over-victim only_the_tmpfs_on_victim
check mount-victim-dir-unchanged test "$(vdir_sum)" = "$VDIR0"
if [ "$MRC" = 0 ]; then
  # The snapshots are in one of the attacker's real directories, read-only.
  MP=$(mounts_under "$HOMEA" | head -1)
  check mount-in-a-held-dir bash -c "[ -n '$MP' ] && ls '$MP' | grep -q '^[0-9]\{8\}T' && findmnt -n -o OPTIONS '$MP' | grep -q '^ro'"
  # The mount's parent moved away and a link to the victim in its place: umount goes by
  # the mount's identity, never by the path, and leaves the victim's tmpfs alone.
  PARENT=$(dirname "$MP")
  AS bash -c "mv -T '$PARENT' '$HOMEA/moved' && ln -s '$VDIR' '$PARENT'"
  grep " $HOMEA" /proc/mounts
  check umount E2E umount $P
  check umount-left-the-victims-tmpfs only_the_tmpfs_on_victim
else
  check mount-refused-with-6-or-2 bash -c "[ $MRC = 6 ] || [ $MRC = 2 ]"
  check umount E2E umount $P
fi
check nothing-mounted-under-attackers-home nothing_under "$HOMEA"
check victim-dir-unchanged-at-end test "$(vdir_sum)" = "$VDIR0"
umount "$VDIR/mnt"

# ---------------------------------------------------------------- (e)
check victim-file-unchanged-at-end test "$(victim_sum)" = "$VICTIM0"
check no-leftovers assert_no_leftovers
rm -rf "$HOMEA" "$PROMDIR" "$VDIR" "$VICTIM" "$SRC"
