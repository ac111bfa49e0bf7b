#!/bin/bash
# timeout: 1200
# Issue 28, what users of the peers expect: run --dry-run (lists exactly what changed and
# writes nothing), backup.exclude_if_present (CACHEDIR.TAG), backup.exclude_from,
# backup.bwlimit, restore --delete (roll a directory back), diff and find, keys rotate, and
# keys rotate --reencrypt (cut by kill -9, resumed; the old header no longer reads the data).
# One init; every check looks at the result, not only the exit code.
source "$(dirname "$0")/../lib/common.sh"

P=peers
PROFILE=/etc/e2ebackup/profiles/$P.yaml
SRC=/srv/peers
KEY=$DEMO_DIR/$P.key
PIN=$KEY.header
CONT=$SERVER_DIR/$P.luks
OFFLINE=/root/peers-offline
RULES=/etc/e2ebackup/$P.rules
SIG='Signature: 8a477f597d28d172789f06886806bc55'
E2E() { "$E2E_BIN" "$@"; }
last_snapshot() { python3 -c "import json; print(json.load(open('/var/lib/e2ebackup/$P/last-run.json'))['snapshot'])"; }

setup() {
  rm -rf "$SRC" "$OFFLINE"; mkdir -p "$SRC"/{docs,cache/sub,fakecache,shared,roll} "$OFFLINE"
  ssh-keygen -q -t ed25519 -N '' -C offline -f "$OFFLINE/id_ed25519" || return 1
  scenario_profile $P 128M "$SRC" "  keep_last: 5"
  sed -i -e "s#^  keyfile: .*#&\n  recovery_recipients: [\"$(cat "$OFFLINE/id_ed25519.pub")\"]#" \
    -e "s#^  sources: .*#&\n  bwlimit: 1M\n  exclude_if_present: [CACHEDIR.TAG]\n  exclude_from: [$RULES]#" "$PROFILE"
  printf '# left out of every snapshot\n*.iso\n' > "$RULES"; chmod 0644 "$RULES"
  for f in a b keep; do echo "$f v1" > "$SRC/docs/$f.txt"; done
  echo "$SIG" > "$SRC/cache/CACHEDIR.TAG"; echo junk > "$SRC/cache/sub/blob"
  echo "no signature" > "$SRC/fakecache/CACHEDIR.TAG"
  # A tag that someone else planted in root's world-writable directory does not count.
  chmod 0777 "$SRC/shared"; echo "shared data" > "$SRC/shared/data"
  runuser -u nobody -- sh -c "echo '$SIG' > $SRC/shared/CACHEDIR.TAG" || return 1
  head -c 100000 /dev/urandom > "$SRC/disk.iso"
  echo "r1" > "$SRC/roll/one.txt"; echo "r2" > "$SRC/roll/two.txt"
}
check setup setup
check validate E2E validate $P
bad_rules() { # a pattern file others can write is refused (validate and run), naming it
  chmod 0666 "$RULES"; local out rc; out=$("$E2E_BIN" validate $P 2>&1); rc=$?; chmod 0644 "$RULES"
  echo "$out"; [ $rc -ne 0 ] && echo "$out" | grep -q "exclude_from: $RULES"
}
check exclude-from-refused-when-writable bad_rules
bare_bwlimit() { # a bare number is refused with its line
  sed 's/^  bwlimit: 1M/  bwlimit: 500/' "$PROFILE" > /tmp/peersbad.yaml; chmod 0600 /tmp/peersbad.yaml
  local out; out=$("$E2E_BIN" validate /tmp/peersbad.yaml 2>&1); local rc=$?; echo "$out"
  [ $rc = 2 ] && echo "$out" | grep -q "line [0-9]*: backup.bwlimit: .500.: give a unit"
}
check bwlimit-bare-number-refused bare_bwlimit
check init E2E init $P
check run-1 E2E run $P
S1=$(last_snapshot)
tree_as_expected() { # restore everything: the tagged directory and the *.iso are not there
  E2E restore $P latest /srv/peers-r1 || return 1
  local r=/srv/peers-r1$SRC
  [ ! -e "$r/cache" ] || { echo "cache/ was backed up"; return 1; }
  [ ! -e "$r/disk.iso" ] || { echo "disk.iso was backed up"; return 1; }
  [ -f "$r/fakecache/CACHEDIR.TAG" ] || { echo "a tag without signature excluded its directory"; return 1; }
  [ -f "$r/shared/data" ] || { echo "a tag planted by another user excluded root's directory"; return 1; }
  diff -r "$SRC/docs" "$r/docs"
}
check exclude-if-present-and-exclude-from tree_as_expected

# ---- run --dry-run: exactly the changes, nothing written
echo "a v2, longer" > "$SRC/docs/a.txt"; rm "$SRC/docs/b.txt"; echo c > "$SRC/docs/c.txt"
head -c $((4 << 20)) /dev/urandom > "$SRC/docs/big.bin"
dry_run() {
  local before after gen_before gen_after
  before=$(sha256sum "$CONT" | cut -d' ' -f1); gen_before=$(cat /var/lib/e2ebackup/$P/generation)
  "$E2E_BIN" run $P --dry-run > /tmp/peers-dry.txt || return 1
  cat /tmp/peers-dry.txt
  after=$(sha256sum "$CONT" | cut -d' ' -f1); gen_after=$(cat /var/lib/e2ebackup/$P/generation)
  [ "$before" = "$after" ] || { echo "the container changed: $before -> $after"; return 1; }
  [ "$gen_before" = "$gen_after" ] || { echo "the generation record changed"; return 1; }
  [ ! -e "$SERVER_DIR/$P.luks.lock" ] || { echo "lock left behind"; return 1; }
  local want got
  want=$(printf '%s\n' "+ $SRC/docs/a.txt" "+ $SRC/docs/big.bin" "+ $SRC/docs/c.txt" "- $SRC/docs/b.txt" | sort)
  got=$(grep '^[-+] ' /tmp/peers-dry.txt | sort)
  [ "$want" = "$got" ] || { printf 'expected:\n%s\ngot:\n%s\n' "$want" "$got"; return 1; }
  grep -q "^dry run: 3 new or changed (.*), 1 deleted; nothing was written" /tmp/peers-dry.txt
}
check dry-run-lists-exactly-and-writes-nothing dry_run
check no-leftovers-after-dry-run assert_no_leftovers

# ---- bwlimit: the 4 MiB at 1 MiB/s take rsync >= 3 s
bw_run() {
  "$E2E_BIN" -vv run $P > /tmp/peers-run2.txt 2>&1; local rc=$?
  grep -E "bwlimit|rsync took" /tmp/peers-run2.txt
  [ $rc = 0 ] || { tail -20 /tmp/peers-run2.txt; return 1; }
  grep -q -- "--bwlimit=1024" /tmp/peers-run2.txt || { echo "no --bwlimit in rsync's argv"; return 1; }
  local t; t=$(sed -n 's/.*rsync took \([0-9.]*\) s.*/\1/p' /tmp/peers-run2.txt | tail -1)
  metric rsync_4MiB_at_1M_s "$t"
  awk -v t="$t" 'BEGIN{exit !(t >= 3.0)}'
}
check run-2-bwlimit-in-effect bw_run
S2=$(last_snapshot)

# ---- diff and find
diff_ok() {
  "$E2E_BIN" diff $P "$S1" "$S2" > /tmp/peers-diff.txt || return 1; cat /tmp/peers-diff.txt
  local want; want=$(printf '%s\n' "M $SRC/docs/a.txt" "- $SRC/docs/b.txt" "+ $SRC/docs/big.bin" "+ $SRC/docs/c.txt")
  [ "$(cat /tmp/peers-diff.txt)" = "$want" ]
}
check diff-prints-the-changes diff_ok
find_ok() {
  "$E2E_BIN" find $P 'b.txt' > /tmp/peers-find.txt || return 1; cat /tmp/peers-find.txt
  # b.txt only in the first snapshot; keep.txt in both (a whole-path glob)
  [ "$(awk '{print $1, $3}' /tmp/peers-find.txt)" = "$S1 $SRC/docs/b.txt" ] || return 1
  [ "$("$E2E_BIN" find $P "$SRC/*/keep.txt" | awk '{print $1}' | tr '\n' ' ')" = "$S1 $S2 " ]
}
check find-across-snapshots find_ok

# ---- restore --delete: roll a directory back, and only that directory
roll_back() {
  echo "late" > "$SRC/roll/added-later.txt"; echo "edited" > "$SRC/roll/one.txt"
  echo "sibling" > "$SRC/docs/sibling-after.txt"
  E2E restore $P latest / --path "$SRC/roll" --force --delete || return 1
  [ ! -e "$SRC/roll/added-later.txt" ] || { echo "the file added after the snapshot is still there"; return 1; }
  [ "$(cat "$SRC/roll/one.txt")" = r1 ] && [ "$(cat "$SRC/roll/two.txt")" = r2 ] || { echo "not restored"; return 1; }
  [ -f "$SRC/docs/sibling-after.txt" ] || { echo "--delete reached outside --path"; return 1; }
  rm "$SRC/docs/sibling-after.txt"
}
check restore-delete-rolls-back roll_back
check restore-delete-needs-path bash -c "$E2E_BIN restore $P latest /srv/x --force --delete; [ \$? = 2 ]"

# ---- keys rotate
cp "$KEY" /root/peers-old.key
rotate() {
  E2E keys rotate $P || return 1
  ! cmp -s "$KEY" /root/peers-old.key || { echo "the keyfile did not change"; return 1; }
  [ ! -e "$KEY.old" ] && [ ! -e "$KEY.new" ] || { echo "leftover keyfiles"; ls -l "$DEMO_DIR"; return 1; }
  if cryptsetup open --test-passphrase --key-file /root/peers-old.key "$CONT" 2>/dev/null; then
    echo "the old keyfile still opens the container"; return 1
  fi
  cryptsetup open --test-passphrase --key-file "$KEY" "$CONT" || { echo "the new keyfile does not open it"; return 1; }
  cmp -n "$(stat -c %s "$PIN")" "$PIN" "$CONT" || { echo "pinned header differs from the server's"; return 1; }
}
check keys-rotate rotate
check keys-verify-after-rotate E2E keys verify $P --identity "$OFFLINE/id_ed25519"
echo "after rotation" > "$SRC/docs/after.txt"
check run-after-rotate E2E run $P
restore_docs() { # restore_docs TARGET: the latest snapshot's docs/ equals the source's
  E2E restore $P latest "$1" --path "$SRC/docs" || return 1
  diff -r "$SRC/docs" "$1$SRC/docs"
}
check restore-after-rotate restore_docs /srv/peers-r3

# ---- keys rotate --reencrypt: a new volume key. The server kept the header and keyfile of
# before (the case rotation alone does not cover); cut by kill -9 at 10% or more, resumed.
cp "$PIN" /root/peers-pre.header; cp "$KEY" /root/peers-pre.key
reencrypt_cut() {
  local log=/root/reencrypt-1.log
  du -k "$CONT" | awk '{print "server allocation before: " $1 " KiB"}'
  bg_until 're-encrypted .* of ' "$log" "$E2E_BIN" keys rotate $P --reencrypt
  kill -9 $BG_PID 2>/dev/null; wait $BG_PID 2>/dev/null
  cat "$log"
  grep -q 're-encrypted .* of ' "$log" || { echo "no progress line before the cut"; return 1; }
  grep -q 'online-reencrypt' <(cryptsetup luksDump "$PIN") \
    || { echo "the pinned header does not record the unfinished re-encryption"; return 1; }
}
check reencrypt-cut reencrypt_cut
refused_meanwhile() {
  local out rc; out=$("$E2E_BIN" run $P 2>&1); rc=$?; echo "$out" | tail -3
  [ $rc != 0 ] && echo "$out" | grep -q 'unfinished `keys rotate --reencrypt`: run' \
    && echo "$out" | grep -q "e2ebackup keys rotate $P --reencrypt\` again"
}
check run-refused-while-unfinished refused_meanwhile
status_says() { # status (what monitoring reads) says so, exit 3
  local out rc; out=$("$E2E_BIN" status $P 2>&1); rc=$?
  echo "$out" | grep 'key rotation'
  [ $rc = 3 ] && echo "$out" | grep -q "unfinished .keys rotate --reencrypt.: no backup is taken until .e2ebackup keys rotate $P --reencrypt"
}
check status-says-unfinished status_says
reencrypt_resume() {
  local out rc; out=$("$E2E_BIN" keys rotate $P --reencrypt 2>&1); rc=$?; echo "$out" | tail -12
  [ $rc = 0 ] || return 1
  echo "$out" | grep -q 'going on from .* where the last attempt stopped' || { echo "did not resume"; return 1; }
  du -k "$CONT" | awk '{print "server allocation after: " $1 " KiB"}'
  ! cmp -s "$KEY" /root/peers-pre.key || { echo "the keyfile did not change"; return 1; }
  cmp -n "$(stat -c %s "$PIN")" "$PIN" "$CONT" || { echo "pinned header differs from the server's"; return 1; }
  if cryptsetup luksDump "$PIN" | grep -q 'online-reencrypt'; then echo "still recorded as unfinished"; return 1; fi
  # The attack: the old header and the old keyfile still unlock a keyslot, but the volume
  # key they give no longer reads the data.
  cryptsetup open --readonly --header /root/peers-pre.header --key-file /root/peers-pre.key "$CONT" peers-old \
    || { echo "the old header no longer opens at all (expected: it opens, and reads noise)"; return 1; }
  local fs; fs=$(blkid -p -o value -s TYPE /dev/mapper/peers-old); cryptsetup close peers-old
  [ -z "$fs" ] || { echo "the old volume key still reads a $fs filesystem"; return 1; }
}
check reencrypt-resume reencrypt_resume
check keys-verify-after-reencrypt E2E keys verify $P --identity "$OFFLINE/id_ed25519"
check verify-after-reencrypt E2E verify $P
echo "after re-encryption" > "$SRC/docs/after2.txt"
check run-after-reencrypt E2E run $P
check restore-after-reencrypt restore_docs /srv/peers-r4
trim_after_reencrypt() { # the re-encryption allocated the whole container; trim gives it back
  local before after; sync; before=$(du -k "$CONT" | cut -f1)
  E2E trim $P || return 1
  sync; after=$(du -k "$CONT" | cut -f1)
  metric reencrypt_alloc_kib "$before"; metric reencrypt_then_trim_alloc_kib "$after"
  [ "$after" -lt $((before / 2)) ] || { echo "trim gave back too little: $before -> $after KiB"; return 1; }
}
check trim-after-reencrypt trim_after_reencrypt
check final-no-leftovers assert_no_leftovers
