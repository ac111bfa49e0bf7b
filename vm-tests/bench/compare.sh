#!/bin/bash
# timeout: 86400
# Benchmark (not part of the CI set; run by scripts/bench.sh): e2ebackup against restic
# (sftp repository), borg (ssh repository) and the raw `ssh cat` of the same bytes, in one
# boot, on generated data sets and the guest's one loopback sshd. Every figure is a wall
# time under QEMU's software emulation: compare ratios, not absolute numbers.
#
# Two axes, every cell in the same boot:
#   - file count (BENCH_SCALES, default "2000 20000"): N small files (100 B - 8 KiB,
#     random), 20 per directory, 10 directories per top-level directory;
#   - link profile (BENCH_PROFILES, default "wan lo"): `lo` is the guest's loopback as it
#     is; `wan` is loopback with `tc qdisc ... netem $BENCH_WAN` (default: 25 ms each way,
#     so 50 ms round trip, and 50 Mbit/s, shared by both directions since lo has one qdisc),
#     applied before the cell and removed after it.
# Per cell and per tool (BENCH_TOOLS, default "e2e restic borg"), interleaved so that a
# drift of the shared machine hits every tool alike: full backup into a new repository,
# no-change backup, 1% of the files rewritten then backup, restore of everything (caches
# dropped before each; checked with diff -r). Plus the tar of the data set through
# `ssh host 'cat > file'` on the same link. Peak RSS: VmHWM of the tool's own process,
# sampled every 0.2 s (children such as rsync and ssh are not counted, for any tool).
#
# A/B of a restore change in the same boot: if the file BENCH_B_BIN (default
# $E2E_OUT/e2ebackup-b) exists when a cell's restores start, that binary restores the
# same snapshot right after the tested one (key e2eb_restore).
# Optional (off by default, the figures of earlier runs): BENCH_LAYER_MIB=64 (layer by
# layer, two ciphers, plus dm-crypt on a local loop), BENCH_ALLOC_SIZES="1 4 16" (server
# bytes after init against the blog recipe).
#
# Results: $E2E_OUT/bench.txt ("key value" lines, key = n<N>.<profile>.<tool>_<step>.s|rss_kib);
# vm-tests/bench/table.py renders them.
source "$(dirname "$0")/../lib/common.sh"
source "$(dirname "$0")/lib.sh"
RES=$E2E_OUT/bench.txt
: > "$RES"
SCALES=${BENCH_SCALES:-2000 20000}
PROFILES=${BENCH_PROFILES:-wan lo}
TOOLS=" ${BENCH_TOOLS:-e2e restic borg} "
WAN=${BENCH_WAN:-delay 25ms rate 50mbit}
B_BIN=${BENCH_B_BIN:-$E2E_OUT/e2ebackup-b}
SRC=/srv/bench-data
RESTORE=/srv/restore
TAR=/srv/bench-data.tar
KEY=$DEMO_DIR/id_ed25519
SSH_OPTS=(-F /dev/null -i "$KEY" -o IdentitiesOnly=yes -o "UserKnownHostsFile=$DEMO_DIR/known_hosts"
  -o StrictHostKeyChecking=yes -o BatchMode=yes)
SERVER=backupuser@127.0.0.1
export RESTIC_PASSWORD=bench-only BORG_PASSPHRASE=bench-only
export RESTIC_CACHE_DIR=/root/.cache/restic BORG_BASE_DIR=/root
RESTIC_SFTP="ssh ${SSH_OPTS[*]} $SERVER -s sftp"
export BORG_RSH="ssh ${SSH_OPTS[*]}"

res() { echo "$1 $2" | tee -a "$RES"; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.1f", b-a}'; }
has() { case "$TOOLS" in *" $1 "*) return 0 ;; esac; return 1; }
T0=$(_uptime)

# measure NAME CMD...: wall seconds, the command's own peak RSS (KiB) and the guest's CPU
# use, as NAME.s, NAME.rss_kib and NAME.cpu_pct; a check NAME that fails if the command does.
measure() { local name=$1; shift; bench_step "$name" . res "$@"; }

# ---------------------------------------------------------------- the data sets
# make_data N / change_one_percent SEED: vm-tests/bench/dataset.py (shared with the host tier).
make_data() { rm -rf "$SRC"; python3 "$(dirname "$0")/dataset.py" make "$SRC" "$1"; }
change_one_percent() { python3 "$(dirname "$0")/dataset.py" change "$SRC" "$1"; }

# ---------------------------------------------------------------- link profiles
link_on() {
  case "$1" in
    lo) return 0 ;;
    # limit: netem's queue in packets (default 1000); rate limiting must delay, not drop.
    wan) modprobe sch_netem 2>/dev/null; tc qdisc add dev lo root netem $WAN limit 100000 ;;
    *) echo "unknown link profile $1"; return 1 ;;
  esac
}
link_off() { tc qdisc del dev lo root 2>/dev/null; return 0; }
# The smallest of five TCP connects to sshd, in ms: one round trip.
rtt_ms() {
  python3 - <<'PY'
import socket, time
best = 1e9
for _ in range(5):
    a = time.monotonic(); s = socket.create_connection(("127.0.0.1", 22)); best = min(best, time.monotonic() - a); s.close()
print("%.1f" % (best * 1000))
PY
}

# ---------------------------------------------------------------- one cell
# cell N PROFILE: every tool on the data set of N files (already in $SRC) over PROFILE.
raw_ssh() { exec ssh "${SSH_OPTS[@]}" "$SERVER" 'cat > /srv/backup/raw.tar' < "$TAR"; }
restic_() { exec restic -r "sftp:$SERVER:/srv/backup/restic-$C" -o "sftp.command=$RESTIC_SFTP" "$@"; }
borg_() { exec borg "$@"; }
borg_extract() { mkdir -p "$RESTORE/borg" && cd "$RESTORE/borg" && exec borg extract "ssh://$SERVER/srv/backup/borg-$C::change1"; }
restored() { diff -r "$SRC" "$1$SRC" > /dev/null; }
# Every restore starts with cold caches (the server side's copy of the repository too).
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }

cell() {
  local n=$1 l=$2 seed=$3 P a
  C=n$n.$l
  P=b$n$l
  local BORG_REPO=ssh://$SERVER/srv/backup/borg-$C
  a=$(_uptime)
  check "$C-link-on" link_on "$l" || return 1
  if ! tc qdisc show dev lo | grep -q netem && [ "$l" = wan ]; then fail "$C: netem not applied"; return 1; fi
  res "$C.link.rtt_ms" "$(rtt_ms)"
  measure "$C.limit_ssh_cat" raw_ssh
  rm -f /srv/backup/raw.tar
  # A 2G container has 32768 inodes (one per 64 KiB): enough for 20k files and three
  # snapshots' directories; 100k files need 8G.
  if has e2e; then
    check "$C-e2e-profile" scenario_profile "$P" "$([ "$n" -le 20000 ] && echo 2G || echo 8G)" "$SRC" "  keep_last: 10"
    measure "$C.e2e_init" "$E2E_BIN" init "$P"
  fi
  has restic && measure "$C.restic_init" restic_ init
  has borg && measure "$C.borg_init" borg init -e repokey "$BORG_REPO"
  has e2e && measure "$C.e2e_full" "$E2E_BIN" run "$P"
  has restic && measure "$C.restic_full" restic_ backup "$SRC"
  has borg && measure "$C.borg_full" borg_ create "$BORG_REPO::full" "$SRC"
  has e2e && measure "$C.e2e_nochange" "$E2E_BIN" run "$P"
  has restic && measure "$C.restic_nochange" restic_ backup "$SRC"
  has borg && measure "$C.borg_nochange" borg_ create "$BORG_REPO::nochange" "$SRC"
  check "$C-change" change_one_percent "$seed"
  has e2e && measure "$C.e2e_change1" "$E2E_BIN" run "$P"
  has restic && measure "$C.restic_change1" restic_ backup "$SRC"
  has borg && measure "$C.borg_change1" borg_ create "$BORG_REPO::change1" "$SRC"
  mkdir -p "$RESTORE"
  if has e2e; then
    cold
    measure "$C.e2e_restore" "$E2E_BIN" restore "$P" latest "$RESTORE/e2e"
    check "$C-e2e-restored-identical" restored "$RESTORE/e2e"
    res "$C.e2e_server.bytes" "$(alloc_bytes "/srv/backup/$P.luks")"
    rm -rf "$RESTORE/e2e"
    if [ -x "$B_BIN" ]; then
      cold
      measure "$C.e2eb_restore" "$B_BIN" restore "$P" latest "$RESTORE/e2e"
      check "$C-e2eb-restored-identical" restored "$RESTORE/e2e"
      rm -rf "$RESTORE/e2e"
    fi
  fi
  if has restic; then
    cold
    measure "$C.restic_restore" restic_ restore latest --target "$RESTORE/restic"
    check "$C-restic-restored-identical" restored "$RESTORE/restic"
    res "$C.restic_server.bytes" "$(du -sB1 "/srv/backup/restic-$C" | cut -f1)"
    rm -rf "$RESTORE/restic"
  fi
  if has borg; then
    cold
    measure "$C.borg_restore" borg_extract
    check "$C-borg-restored-identical" restored "$RESTORE/borg"
    res "$C.borg_server.bytes" "$(du -sB1 "/srv/backup/borg-$C" | cut -f1)"
    rm -rf "$RESTORE/borg"
  fi
  link_off
  # Free the server disk and the caches (the guest's root is tmpfs) for the next cell.
  rm -rf "/srv/backup/$P.luks"* "/srv/backup/restic-$C" "/srv/backup/borg-$C" /root/.cache/restic /root/.cache/borg
  check "$C-clean" assert_no_leftovers
  res "$C.wall.s" "$(secs "$a" "$(_uptime)")"
}

seed=7
for n in $SCALES; do
  check "make-data-$n" make_data "$n"
  res "dataset.n$n.files" "$(find "$SRC" -type f | wc -l)"
  res "dataset.n$n.bytes" "$(find "$SRC" -type f -printf '%s\n' | awk '{t+=$1} END{print t}')"
  tar -C /srv -cf "$TAR" bench-data
  sync
  for l in $PROFILES; do
    cell "$n" "$l" "$seed"
    link_off
    seed=$((seed + 1))
  done
done
res bench.matrix.wall.s "$(secs "$T0" "$(_uptime)")"

# ---------------------------------------------------------------- optional: layers
if [ -n "${BENCH_LAYER_MIB:-}" ]; then
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

fi

# ---------------------------------------------------------------- optional: allocation after init
[ -s /run/bench.key ] || head -c 4096 /dev/urandom > /run/bench.key
for g in ${BENCH_ALLOC_SIZES:-}; do
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
