#!/bin/bash
# timeout: 3300
# Benchmark (not part of the CI set; run by scripts/bench.sh): e2ebackup against restic
# (sftp repository) and borg (ssh repository) and against the physical limit, in one boot,
# on one generated data set and the guest's one loopback sshd. Every figure is a wall time
# under QEMU's software emulation: compare ratios, not absolute numbers.
#
#   1. full backup, 2. incremental with no change and with 1% of the files changed,
#   3. restore of everything (checked with diff -r), 4. server bytes allocated by init for
#   1, 4 and 16 GiB containers against the blog recipe's mkfs, 5. peak RSS (VmHWM of the
#   tool's own process, sampled; children such as rsync and ssh are not counted).
#   Plus the layers one by one (ssh, sshfs, loop, dm-crypt) with two SSH ciphers.
#
# Results: $E2E_OUT/bench.txt ("key value" lines); vm-tests/bench/table.py renders them.
# Knobs: BENCH_FILES (default 2000), BENCH_MIB (default 128), BENCH_ALLOC_SIZES ("1 4 16").
source "$(dirname "$0")/../lib/common.sh"
RES=$E2E_OUT/bench.txt
: > "$RES"
N=${BENCH_FILES:-2000}
MIB=${BENCH_MIB:-128}
SRC=/srv/bench-data
RESTORE=/srv/restore
TAR=/srv/bench-data.tar
KEY=$DEMO_DIR/id_ed25519
SSH_OPTS=(-F /dev/null -i "$KEY" -o IdentitiesOnly=yes -o "UserKnownHostsFile=$DEMO_DIR/known_hosts"
  -o StrictHostKeyChecking=yes -o BatchMode=yes)
SERVER=backupuser@127.0.0.1
export RESTIC_PASSWORD=bench-only BORG_PASSPHRASE=bench-only
export RESTIC_CACHE_DIR=/root/.cache/restic BORG_BASE_DIR=/root
RESTIC_REPO=sftp:$SERVER:/srv/backup/restic
RESTIC_SFTP="ssh ${SSH_OPTS[*]} $SERVER -s sftp"
export BORG_RSH="ssh ${SSH_OPTS[*]}"
BORG_REPO=ssh://$SERVER/srv/backup/borg

res() { echo "$1 $2" | tee -a "$RES"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b-a}'; }

# A pipe nobody writes to: `read -t` on it is a sleep without forking (a process start
# costs ~0.1 s of emulated CPU, which the sampler must not steal from the measured tool).
mkfifo /run/bench-tick; exec 9<>/run/bench-tick

# measure NAME CMD...: wall seconds and the command's own peak RSS (KiB), as NAME.s and
# NAME.rss_kib; a check NAME that fails if the command does.
measure() {
  local name=$1; shift
  local a b rc pid hwm=0 k v
  echo "[$(_uptime)] >>> bench $name: $*"
  a=$(_uptime)
  "$@" > "$E2E_OUT/bench-$name.log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    while read -r k v _; do [ "$k" = VmHWM: ] && hwm=$v; done < "/proc/$pid/status" 2>/dev/null
    read -r -t 0.2 -u 9 _
  done
  wait "$pid"; rc=$?
  b=$(_uptime)
  res "$name.s" "$(secs "$a" "$b")"
  res "$name.rss_kib" "$hwm"
  if [ $rc -eq 0 ]; then echo "PASS $name $(secs "$a" "$b")s" >> "$_CHECKS"
  else echo "FAIL $name (exit $rc; see bench-$name.log)" | tee -a "$_CHECKS"; tail -5 "$E2E_OUT/bench-$name.log"; fi
  return $rc
}

# ---------------------------------------------------------------- the data set
make_data() {
  rm -rf "$SRC"
  python3 - "$SRC" "$N" "$MIB" <<'PY'
import os, random, sys
root, n, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(42)
# Mixed sizes: most files small, some medium, a few large (like a home directory).
sizes = []
for i in range(n):
    r = rng.random()
    sizes.append(rng.randint(100, 16 << 10) if r < 0.70 else
                 rng.randint(16 << 10, 1 << 20) if r < 0.97 else rng.randint(1 << 20, 8 << 20))
scale = (mib << 20) / sum(sizes)
for i, s in enumerate(sizes):
    d = os.path.join(root, "d%02d" % (i % 40), "s%d" % (i % 7))
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "f%05d.bin" % i), "wb") as f:
        f.write(rng.randbytes(max(1, int(s * scale))))  # incompressible: no tool gains by compression
PY
}
change_one_percent() {
  python3 - "$SRC" <<'PY'
import os, random, sys
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(sys.argv[1]) for f in fs)
rng = random.Random(7)
for p in rng.sample(files, max(1, len(files) // 100)):
    with open(p, "r+b") as f:
        f.write(rng.randbytes(min(4096, os.path.getsize(p))))
PY
}
check make-data make_data
res dataset.files "$(find "$SRC" -type f | wc -l)"
res dataset.bytes "$(find "$SRC" -type f -printf '%s\n' | awk '{t+=$1} END{print t}')"
tar -C /srv -cf "$TAR" bench-data
sync

# ---------------------------------------------------------------- physical limits
# The same bytes over the same sshd with nothing else: the wire limit.
# (Functions given to measure end in exec, so the sampled pid is the tool, not a subshell.)
raw_ssh() { exec ssh "${SSH_OPTS[@]}" "$SERVER" 'cat > /srv/backup/raw.tar' < "$TAR"; }
measure limit_ssh_cat raw_ssh
rm -f /srv/backup/raw.tar
# dm-crypt on a local direct-I/O loop (no network): the crypto-plus-disk ceiling.
local_crypt() {
  truncate -s 1G /srv/local.img
  local lo; lo=$(losetup --direct-io=on --show -f /srv/local.img) || return 1
  head -c 4096 /dev/urandom > /run/bench.key
  cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --sector-size 4096 --key-file /run/bench.key "$lo" &&
  cryptsetup open --key-file /run/bench.key "$lo" benchlocal &&
  a=$(_uptime) && dd if="$TAR" of=/dev/mapper/benchlocal bs=1M oflag=direct conv=fsync status=none &&
  b=$(_uptime) && res limit_local_dmcrypt_write.s "$(secs "$a" "$b")"
  local rc=$?
  cryptsetup close benchlocal; losetup -d "$lo"; rm -f /srv/local.img
  return $rc
}
check limit-local-dmcrypt local_crypt

# ---------------------------------------------------------------- layers, two ciphers
# 64 MiB (BENCH_LAYER_MIB) through each layer of the stack: ssh, a file on sshfs, dm-crypt on a direct-I/O
# loop on that file. chacha20-poly1305 is OpenSSH's default; AES-GCM uses AES-NI.
LAYER_MIB=${BENCH_LAYER_MIB:-64}
layers() {
  local c=$1 tag=$2 m=/run/bench-sshfs lo rc=0 a b
  # One handshake alone, so that the transfer rate below can leave it out.
  a=$(_uptime)
  ssh "${SSH_OPTS[@]}" -c "$c" "$SERVER" true || rc=1
  b=$(_uptime); res "layer.$tag.handshake.s" "$(secs "$a" "$b")"
  a=$(_uptime)
  head -c $((LAYER_MIB << 20)) "$TAR" | ssh "${SSH_OPTS[@]}" -c "$c" "$SERVER" 'cat > /srv/backup/layer.raw' || rc=1
  b=$(_uptime); res "layer.$tag.ssh.s" "$(secs "$a" "$b")"
  mkdir -p $m
  sshfs -F /dev/null -o "IdentityFile=$KEY,IdentitiesOnly=yes,UserKnownHostsFile=$DEMO_DIR/known_hosts,BatchMode=yes,idmap=none,Ciphers=$c" \
    "$SERVER:/srv/backup" $m || return 1
  a=$(_uptime)
  dd if="$TAR" of=$m/layer.file bs=1M count=$LAYER_MIB conv=fsync status=none || rc=1
  b=$(_uptime); res "layer.$tag.sshfs.s" "$(secs "$a" "$b")"
  truncate -s 256M $m/layer.luks
  lo=$(losetup --direct-io=on --show -f $m/layer.luks) || { umount $m; return 1; }
  a=$(_uptime)
  dd if="$TAR" of="$lo" bs=1M count=$LAYER_MIB oflag=direct conv=fsync status=none || rc=1
  b=$(_uptime); res "layer.$tag.loop.s" "$(secs "$a" "$b")"
  cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --sector-size 4096 --key-file /run/bench.key "$lo" && cryptsetup open --key-file /run/bench.key "$lo" benchlayer || rc=1
  a=$(_uptime)
  dd if="$TAR" of=/dev/mapper/benchlayer bs=1M count=$LAYER_MIB oflag=direct conv=fsync status=none || rc=1
  b=$(_uptime); res "layer.$tag.dmcrypt.s" "$(secs "$a" "$b")"
  cryptsetup close benchlayer; losetup -d "$lo"
  rm -f $m/layer.file $m/layer.luks /srv/backup/layer.raw
  umount $m
  return $rc
}
res layer.mib $LAYER_MIB
check layers-chacha20 layers chacha20-poly1305@openssh.com chacha
check layers-aes128gcm layers aes128-gcm@openssh.com aesgcm
check layers-clean assert_no_leftovers

# ---------------------------------------------------------------- e2ebackup
P=bench
check e2e-profile scenario_profile $P 1G "$SRC" "  keep_last: 10"
measure e2e_init "$E2E_BIN" init $P
measure e2e_full "$E2E_BIN" run $P
measure e2e_nochange "$E2E_BIN" run $P
check change-1 change_one_percent
measure e2e_change1 "$E2E_BIN" run $P
mkdir -p $RESTORE
measure e2e_restore "$E2E_BIN" restore $P latest $RESTORE/e2e
check e2e-restored-identical diff -r "$SRC" $RESTORE/e2e$SRC
res e2e_server.bytes "$(alloc_bytes /srv/backup/$P.luks)"
rm -rf $RESTORE/e2e
check e2e-clean assert_no_leftovers

# The same three backups by each peer need the data set as it was before the change.
check data-again make_data

# ---------------------------------------------------------------- restic (sftp)
restic_() { exec restic -r "$RESTIC_REPO" -o "sftp.command=$RESTIC_SFTP" "$@"; }
measure restic_init restic_ init
measure restic_full restic_ backup "$SRC"
measure restic_nochange restic_ backup "$SRC"
check change-2 change_one_percent
measure restic_change1 restic_ backup "$SRC"
measure restic_restore restic_ restore latest --target $RESTORE/restic
check restic-restored-identical diff -r "$SRC" $RESTORE/restic$SRC
res restic_server.bytes "$(du -sB1 /srv/backup/restic | cut -f1)"
rm -rf $RESTORE/restic

check data-again-2 make_data

# ---------------------------------------------------------------- borg (ssh)
measure borg_init borg init -e repokey "$BORG_REPO"
measure borg_full borg create "$BORG_REPO::full" "$SRC"
measure borg_nochange borg create "$BORG_REPO::nochange" "$SRC"
check change-3 change_one_percent
measure borg_change1 borg create "$BORG_REPO::change1" "$SRC"
borg_extract() { mkdir -p $RESTORE/borg && cd $RESTORE/borg && exec borg extract "$BORG_REPO::change1"; }
measure borg_restore borg_extract
check borg-restored-identical diff -r "$SRC" $RESTORE/borg$SRC
res borg_server.bytes "$(du -sB1 /srv/backup/borg | cut -f1)"
cd /; rm -rf $RESTORE/borg

# ---------------------------------------------------------------- allocation after init
for g in ${BENCH_ALLOC_SIZES:-1 4 16}; do
  check "alloc-profile-${g}G" scenario_profile "alloc$g" "${g}G" "$SRC"
  measure "e2e_init_${g}G" "$E2E_BIN" init "alloc$g"
  res "alloc.e2e.${g}G.bytes" "$(alloc_bytes /srv/backup/alloc$g.luks)"
  rm -f /srv/backup/alloc$g.luks*
  # The blog recipe: luksFormat, then mkfs.ext4 -E lazy_itable_init=0,lazy_journal_init=0
  # with mke2fs's defaults (written locally here: the allocation is the same over sshfs).
  recipe() {
    truncate -s "${g}G" /srv/recipe.img
    local lo; lo=$(losetup --direct-io=on --show -f /srv/recipe.img) || return 1
    cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
      --key-file /run/bench.key "$lo" && cryptsetup open --key-file /run/bench.key "$lo" recipe &&
    mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/recipe
    local rc=$?
    cryptsetup close recipe; losetup -d "$lo"
    return $rc
  }
  check "recipe-${g}G" recipe
  res "alloc.recipe.${g}G.bytes" "$(alloc_bytes /srv/recipe.img)"
  rm -f /srv/recipe.img
done
check all-clean assert_no_leftovers
