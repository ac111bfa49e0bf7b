#!/bin/bash
# timeout: 1200
# Issue 4: getting data back. Odd files survive run + restore byte- and metadata-identical;
# the read-only mount refuses writes and holds the lock; prune keeps what the policy says.
source "$(dirname "$0")/../lib/common.sh"

P=restore
PROFILE=/etc/e2ebackup/profiles/$P.yaml
SRC=/srv/odd
E2E() { "$E2E_BIN" "$@"; }

make_profile() { scenario_profile $P 512M "$SRC" "  keep_last: 1
  keep_daily: 2"; }

odd_tree() {
  rm -rf "$SRC"; mkdir -p "$SRC/dir/empty" "$SRC/deep/a/b/c"
  head -c 100000 /dev/urandom > "$SRC/dir/data.bin"
  ln "$SRC/dir/data.bin" "$SRC/dir/hardlink.bin"
  ln -s data.bin "$SRC/dir/symlink"
  ln -s /nonexistent/target "$SRC/dir/dangling"
  truncate -s 64M "$SRC/sparse.img"; echo middle | dd of="$SRC/sparse.img" bs=1 seek=$((32<<20)) conv=notrunc 2>/dev/null
  echo owned > "$SRC/nobody-owns-this"; chown 4242:4343 "$SRC/nobody-owns-this"
  echo x > "$SRC/xattr.txt"; setfattr -n user.comment -v "kept by e2ebackup" "$SRC/xattr.txt"
  echo a > "$SRC/acl.txt"; setfacl -m u:4242:rw "$SRC/acl.txt"
  touch "$SRC/$(printf 'new\nline')"
  touch "$SRC/$(printf 'latin1-\xe9t\xe9')"
  chmod 0751 "$SRC/deep/a"; chmod 4755 "$SRC/dir/data.bin" 2>/dev/null
  touch -d '2001-02-03 04:05:06' "$SRC/deep/a/b/c"
}

identical() { # no difference by checksum, perms, owners, links, ACLs, xattrs, times
  local out; out=$(rsync -aHAXc --numeric-ids --dry-run --itemize-changes --delete "$1/" "$2/")
  [ -z "$out" ] || { echo "differences:"; echo "$out"; return 1; }
}

check profile make_profile
check odd-tree odd_tree
check init E2E init $P
check run E2E run $P
check snapshots-json bash -c "$E2E_BIN snapshots $P --json | python3 -c 'import json,sys; d=json.load(sys.stdin); assert len(d)==1 and d[0][\"files\"]>=8, d'"
check restore-latest E2E restore $P latest /srv/restore/full
check restored-identical identical "$SRC" "/srv/restore/full$SRC"
check sparse-stays-sparse test "$(alloc_bytes "/srv/restore/full$SRC/sparse.img")" -lt $((8 << 20))
check hardlink-kept test "$(stat -c %i "/srv/restore/full$SRC/dir/data.bin")" = "$(stat -c %i "/srv/restore/full$SRC/dir/hardlink.bin")"
check restore-refuses-non-empty bash -c "$E2E_BIN restore $P latest /srv/restore/full; [ \$? = 2 ]"
check restore-one-path E2E restore $P latest /srv/restore/part --path "$SRC/dir"
check one-path-identical identical "$SRC/dir" "/srv/restore/part$SRC/dir"
check one-path-only test ! -e "/srv/restore/part$SRC/sparse.img"
check no-leftovers-after-restore assert_no_leftovers

mkdir -p /mnt/browse
check mount-ro E2E mount $P /mnt/browse
check browse-sees-snapshot test -f "/mnt/browse/$(ls /mnt/browse | head -1)$SRC/xattr.txt"
check mount-refuses-writes bash -c "! touch /mnt/browse/x 2>/dev/null && ! touch /mnt/browse/*$SRC/new 2>/dev/null"
check luks-mapping-read-only test "$(blockdev --getro /dev/mapper/e2ebackup-$P)" = 1
check run-while-mounted-exits-4 bash -c "$E2E_BIN run $P; [ \$? = 4 ]"
check umount E2E umount $P
check no-leftovers-after-umount assert_no_leftovers

# Retention with controlled times: plant empty snapshots with chosen ids by hand. A snapshot
# counts only when the container's authenticated list (STATE) names it, so the planted ids
# are also written into STATE, before the real one (commit order), and STATE is signed again
# with this client's MAC key (derived from the keyfile, src/generation.rs), as a client that
# had committed them would have; the generation stays, so the client's record agrees.
sign_state() {
  python3 - "$1" "$DEMO_DIR/restore.key" "$2" <<'PY'
import hashlib, hmac, json, sys
root, keyfile, planted = sys.argv[1], sys.argv[2], sys.argv[3].split()
st = json.load(open(root + "/STATE"))
st["snapshots"] = planted + [s for s in st["snapshots"] if s not in planted]
key = hashlib.sha256(b"e2ebackup generation MAC v1\0" + open(keyfile, "rb").read()).digest()
msg = "generation %d\nwritten %s\n" % (st["generation"], st["written"])
msg += "".join("snapshot %s\n" % s for s in st["snapshots"])
st["mac"] = hmac.new(key, msg.encode(), hashlib.sha256).hexdigest()
with open(root + "/STATE", "w") as f:
    json.dump(st, f, indent=2)
PY
}
plant() {
  local L; L=$(losetup -f --show --direct-io=on "$SERVER_DIR/restore.luks")
  cryptsetup open --key-file "$DEMO_DIR/restore.key" "$L" plant && mkdir -p /mnt/plant && mount /dev/mapper/plant /mnt/plant &&
  for id in 20250101T100000Z 20250101T200000Z 20250102T100000Z 20250103T090000Z 20250103T230000Z; do
    cp -a "/mnt/plant/snapshots/$(ls /mnt/plant/snapshots | tail -1)" "/mnt/plant/snapshots/$id.tmp" 2>/dev/null || mkdir "/mnt/plant/snapshots/$id.tmp"
    mv "/mnt/plant/snapshots/$id.tmp" "/mnt/plant/snapshots/$id"
  done &&
  sign_state /mnt/plant "20250101T100000Z 20250101T200000Z 20250102T100000Z 20250103T090000Z 20250103T230000Z"
  sync; umount /mnt/plant; cryptsetup close plant; losetup -d "$L"
}
check plant-snapshots plant
REAL=$("$E2E_BIN" snapshots $P --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
# keep_last 1 + keep_daily 2: the real (newest) snapshot is last and daily; 20250103T230000Z is
# the newest of the second most recent day; everything else goes.
check prune-dry-run bash -c "$E2E_BIN prune $P --dry-run --json > /tmp/prune.json && python3 - <<PY
import json
d = json.load(open('/tmp/prune.json'))
keep = sorted(x['id'] for x in d if not x['remove'])
assert keep == sorted(['$REAL', '20250103T230000Z']), keep
assert len(d) == 6, d
PY"
check dry-run-removed-nothing test "$("$E2E_BIN" snapshots $P --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')" = 6
check prune E2E prune $P
check prune-kept-exactly bash -c "[ \"\$($E2E_BIN snapshots $P --json | python3 -c 'import json,sys; print(\" \".join(sorted(x[\"id\"] for x in json.load(sys.stdin))))')\" = \"20250103T230000Z $REAL\" ]"
check final-no-leftovers assert_no_leftovers
