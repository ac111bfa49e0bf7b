#!/bin/bash
# Host-tier benchmark: real CPU instead of QEMU's emulation, a round-trip delay instead of
# zero, tens of thousands of files. What scripts/bench.sh cannot show: under TCG every
# step is CPU-bound, so the round trips that dominate on a real WAN link are hidden.
#
# On the host: sshd on 127.0.0.1, reached through vm-tests/bench/delay-proxy.py (DELAY ms
# each way; the host kernel has no netem), serving a local "server" directory. On the same
# data set and the same link, step by step:
#   - e2ebackup's snapshot step (examples/snapshot_step.rs: the metadata read-ahead, the
#     parallel walk, rsync --link-dest, the manifest, the syncs) into ext4 on a direct-I/O
#     loop device on a file on sshfs, as `run` stacks it but without dm-crypt (the host
#     has no device-mapper; it adds CPU, not round trips). The stack is mounted afresh and
#     the caches dropped before each step; mount and unmount are timed apart.
#   - the same step without the read-ahead nor the read-back of the new directories before
#     the manifest (DEVICE not given): the A/B of those levers;
#   - restore's copy on the stack as `restore` builds it (read-only, so the loop device is
#     buffered), with the snapshot's data read from the container in bulk alongside, and the
#     same copy of the other variant's container without that: the A/B of that lever;
#   - restic (sftp) and borg (ssh) backups, and `ssh cat > file` of the same bytes as a tar.
# Full backup, no change, 1% of the files changed, and a restore of the newest backup
# (e2ebackup: restore's copy, snapshots::copy_out, with its read-ahead), checked with diff -r.
# Run as root on Debian; installs what it needs. Prints a Markdown table (also written to target/bench/host-results.md).
#   scripts/bench-host.sh [FILES] [DELAY_MS]      defaults: 20000 files, 25 ms each way
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
DELAY=${2:-25}
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
scripts/install-deps.sh restic borgbackup
cargo build --release --locked --example snapshot_step
STEP=$PWD/target/release/examples/snapshot_step
W=$PWD/target/bench-host
OUT=$PWD/target/bench
mkdir -p "$OUT"
RES=$OUT/host.txt
: > "$RES"

cleanup() {
  set +e
  for m in "$W/mnt" "$W/sshfs"; do mountpoint -q "$m" && umount "$m" 2>/dev/null; done
  for l in $(losetup -j "$W/sshfs/c.img" 2>/dev/null | cut -d: -f1); do losetup -d "$l"; done
  mountpoint -q "$W/sshfs" && fusermount3 -u "$W/sshfs"
  [ -f "$W/sshd.pid" ] && kill "$(cat "$W/sshd.pid")" 2>/dev/null
  [ -n "${PROXY:-}" ] && kill "$PROXY" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
cleanup
trap cleanup EXIT
mkdir -p "$W"/{server,sshfs,mnt,restore,cache}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SSHD_PORT=$(free_port)
PORT=$(free_port)
ssh-keygen -q -t ed25519 -N '' -f "$W/hostkey"
ssh-keygen -q -t ed25519 -N '' -f "$W/id"
cp "$W/id.pub" "$W/authorized_keys"
echo "[127.0.0.1]:$PORT $(cut -d' ' -f1,2 "$W/hostkey.pub")" > "$W/known_hosts"
mkdir -p /run/sshd
/usr/sbin/sshd -f /dev/null -p "$SSHD_PORT" -o ListenAddress=127.0.0.1 -h "$W/hostkey" \
  -o AuthorizedKeysFile="$W/authorized_keys" -o StrictModes=no -o PermitRootLogin=prohibit-password \
  -o PidFile="$W/sshd.pid" -o "Subsystem sftp internal-sftp"
python3 vm-tests/bench/delay-proxy.py "$DELAY" "$PORT" "$SSHD_PORT" &
PROXY=$!
sleep 1
SSH=(ssh -F /dev/null -p "$PORT" -i "$W/id" -o IdentitiesOnly=yes -o "UserKnownHostsFile=$W/known_hosts"
  -o StrictHostKeyChecking=yes -o BatchMode=yes)
SERVER=root@127.0.0.1

res() { echo "$1 $2" | tee -a "$RES"; }
# timed KEY CMD...: wall seconds of CMD as KEY.s
timed() {
  local key=$1 a b
  shift
  a=$(date +%s.%N)
  "$@" > "$W/$key.log" 2>&1 || { echo "bench-host: $key failed:"; tail -5 "$W/$key.log"; exit 1; }
  b=$(date +%s.%N)
  res "$key.s" "$(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.2f", b-a}')"
}
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }

a=$(date +%s.%N)
"${SSH[@]}" "$SERVER" true
res link.handshake.s "$(awk -v a="$a" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')"

# The data set: as vm-tests/bench/compare.sh makes it.
SRC=$W/data
python3 vm-tests/bench/dataset.py make "$SRC" "$N"
res dataset.files "$N"
res dataset.bytes "$(du -sb "$SRC" | cut -f1)"
tar -C "$W" -cf "$W/data.tar" data
change_one_percent() { python3 vm-tests/bench/dataset.py change "$SRC" "$1"; }

# e2ebackup's stack minus dm-crypt: one container per variant, made locally on the server,
# with the ext4 `init` makes (inode count, journal size, mkfs options: snapshot_step --mkfs).
# Runs 5-7 used mke2fs's default journal here (64 MiB at 5 GiB), while `init` made 5 MiB.
# 64 KiB per inode, room for the snapshots' directories.
SIZE_G=$(( N * 64 * 4 / 1024 / 1024 + 1 ))
# The type is given (-t ext4), as e2ebackup's mount(2) gives it: without it mount(8) has
# libblkid probe the device first, 15 serial reads near its end (RAID superblocks and the
# like), 1.7 s of the "mount" at 25 ms each way; runs 5 and 6 counted them (measured with
# the block_rq_issue trace event: 0.32 s with -t, 2.05 s without). 4096-byte sectors, as
# the LUKS2 mapping that `run` mounts has them.
stack_up() {  # stack_up VARIANT [ro]: read-only is buffered, as `restore` attaches it
  sshfs -f -p "$PORT" -o "IdentityFile=$W/id,IdentitiesOnly=yes,UserKnownHostsFile=$W/known_hosts,StrictHostKeyChecking=yes,BatchMode=yes,idmap=none,contain_symlinks,nosuid,nodev,noexec" \
    "$SERVER:$W/server/$1" "$W/sshfs" &
  SSHFS=$!
  for _ in $(seq 100); do mountpoint -q "$W/sshfs" && [ -e "$W/sshfs/c.img" ] && break; sleep 0.1; done
  # The read-ahead windows e2ebackup sets: sshfs::mount's on the FUSE mount, and
  # luks::READ_AHEAD_KIB on the mapping, which the loop device stands in for here (ext4
  # reads its files, the manifests among them, ahead by the window of its device).
  read_ahead_kib src/stack/sshfs.rs > "/sys/class/bdi/$(mountpoint -d "$W/sshfs")/read_ahead_kb"
  local opts
  opts="$EXT4_FLAGS,$(ext4_data)"
  if [ "${2:-}" = ro ]; then
    LOOP=$(losetup -f --show -r -b 4096 "$W/sshfs/c.img")
    opts="ro,$opts"
  else
    LOOP=$(losetup -f --show --direct-io=on -b 4096 "$W/sshfs/c.img")
  fi
  read_ahead_kib src/stack/luks.rs > "/sys/block/${LOOP#/dev/}/queue/read_ahead_kb"
  mount -t ext4 -o "$opts" "$LOOP" "$W/mnt"
}
# The mount options e2ebackup gives ext4: the flags of EXT4_FLAGS in src/stack/mount.rs,
# copied here (MountFlags constants; noatime among them: without it every directory the
# manifest reads gets its atime written, journaled and sent to the server), and the data
# string of EXT4_DATA, read from the source so the harness follows it.
EXT4_FLAGS=nodev,nosuid,noexec,noatime
ext4_data() { sed -n 's/^const EXT4_DATA: &str = "\(.*\)";/\1/p' src/stack/mount.rs; }
[ -n "$(ext4_data)" ] || { echo "bench-host.sh: no EXT4_DATA in src/stack/mount.rs" >&2; exit 1; }
# The product's READ_AHEAD_KIB in the given source file, so the harness follows its value.
read_ahead_kib() { sed -n 's/^pub const READ_AHEAD_KIB: u32 = \([0-9]*\);/\1/p' "$1"; }
# Down as the teardown takes it: a read-write ext4 remounted read-only first
# (mount::ensure_unmounted: fewer flushes than umount alone; a no-op when read-only).
stack_down() {
  mount -o remount,ro "$W/mnt"
  umount "$W/mnt"; losetup -d "$LOOP"; fusermount3 -u "$W/sshfs"; wait "$SSHFS"
}
e2e_variant() {
  local v=$1 dev
  mkdir -p "$W/server/$v"
  truncate -s "${SIZE_G}G" "$W/server/$v/c.img"
  "$STEP" --mkfs "$W/server/$v/c.img"
}
e2e_step() {  # e2e_step VARIANT STEP
  local v=$1 s=$2 dev=
  cold
  timed "$v.mount_$s" stack_up "$v"
  [ "$v" = e2e ] && dev=$LOOP
  timed "$v.$s" "$STEP" "$SRC" "$W/mnt" $dev
  timed "$v.umount_$s" stack_down
}

export RESTIC_PASSWORD=bench-only BORG_PASSPHRASE=bench-only RESTIC_CACHE_DIR=$W/cache/restic BORG_BASE_DIR=$W/cache
export BORG_RSH="${SSH[*]}"
RESTIC=(restic -r "sftp:$SERVER:$W/server/restic" -o "sftp.command=${SSH[*]} $SERVER -s sftp")
BORG_REPO=ssh://$SERVER:$PORT$W/server/borg

timed limit_ssh_cat.full sh -c "${SSH[*]} $SERVER 'cat > $W/server/raw.tar' < $W/data.tar"
e2e_variant e2e
e2e_variant e2e_noreadahead
"${RESTIC[@]}" init > /dev/null
borg init -e repokey "$BORG_REPO"
seed=7
for s in full nochange change1; do
  [ "$s" = change1 ] && change_one_percent "$seed"
  e2e_step e2e "$s"
  e2e_step e2e_noreadahead "$s"
  cold; timed "restic.$s" "${RESTIC[@]}" backup "$SRC"
  cold; timed "borg.$s" borg create "$BORG_REPO::$s" "$SRC"
done

# Restore of the newest backup into an empty directory, caches dropped, checked with diff -r.
restored() { diff -r "$SRC" "$1$SRC" > /dev/null || { echo "bench-host: $1 differs from the source"; exit 1; }; }
cold
timed e2e.mount_restore stack_up e2e ro
timed e2e.restore "$STEP" --restore "$W/mnt" "$W/restore/e2e" "$LOOP" "$W/sshfs/c.img"
timed e2e.umount_restore stack_down
restored "$W/restore/e2e"
cold
timed e2e_noreadahead.mount_restore stack_up e2e_noreadahead ro
timed e2e_noreadahead.restore "$STEP" --restore "$W/mnt" "$W/restore/e2e_noreadahead"
timed e2e_noreadahead.umount_restore stack_down
restored "$W/restore/e2e_noreadahead"
cold; timed restic.restore "${RESTIC[@]}" restore latest --target "$W/restore/restic"
restored "$W/restore/restic"
cold; timed borg.restore sh -c "mkdir -p '$W/restore/borg' && cd '$W/restore/borg' && borg extract '$BORG_REPO::change1'"
restored "$W/restore/borg"

g() { awk -v k="$1" '$1 == k {print $2}' "$RES"; }
x() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf " (%.2fx)", a / b }'; }
# e2ebackup's comparable figure: the stack mounted, the step, the stack unmounted.
for v in e2e e2e_noreadahead; do
  for s in full nochange change1 restore; do
    [ -n "$(g "$v.$s.s")" ] || continue
    res "$v.total_$s.s" "$(awk -v a="$(g "$v.mount_$s.s")" -v b="$(g "$v.$s.s")" -v c="$(g "$v.umount_$s.s")" 'BEGIN{printf "%.2f", a+b+c}')"
  done
done
{
  echo "Command: scripts/bench-host.sh $N $DELAY; $(date -u +%Y-%m-%d), host kernel $(uname -r), $(nproc) cores, real CPU;" \
    "$N files, $(( $(g dataset.bytes) >> 20 )) MiB; $DELAY ms each way through the delay proxy (one SSH handshake $(g link.handshake.s) s)."
  echo
  echo "Seconds; (x) = the tool's time / e2ebackup's, so above 1.00x e2ebackup is faster. e2ebackup = sshfs, a"
  echo "direct-I/O loop and ext4 mounted, the snapshot step, all unmounted again: a run without its preflight"
  echo "handshake and without dm-crypt, which the host lacks."
  echo
  echo "| tool | full backup | no change | 1% changed | restore |"
  echo "|---|---|---|---|---|"
  row() {  # row NAME KEY-PREFIX
    local r="| $1" s
    for s in full nochange change1 restore; do
      if [ -z "$(g "$2$s.s")" ]; then r+=" | -"; continue; fi
      r+=" | $(g "$2$s.s")$( [ "$2" = e2e.total_ ] || x "$(g "$2$s.s")" "$(g "e2e.total_$s.s")")"
    done
    echo "$r |"
  }
  row "e2ebackup (mount, snapshot step, unmount)" e2e.total_
  row "- of which the snapshot step" e2e.
  row "e2ebackup without the read-aheads (metadata; restore: bulk data)" e2e_noreadahead.total_
  row "- of which the snapshot step" e2e_noreadahead.
  row "restic (sftp)" restic.
  row "borg (ssh)" borg.
  echo "| \`ssh cat > file\` of the same bytes (tar) | $(g limit_ssh_cat.full.s)$(x "$(g limit_ssh_cat.full.s)" "$(g e2e.total_full.s)") | | | |"
} | tee "$OUT/host-results.md"
