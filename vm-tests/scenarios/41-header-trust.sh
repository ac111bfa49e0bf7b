#!/bin/bash
# timeout: 600
# Issue 27, items 1 and 4: the LUKS header is made and pinned on the client, its parameters
# are checked at every open, and a damaged filesystem is called damage.
# (a) after `init`, the server's header equals the client's pinned copy byte for byte, and
#     the pinned copy says aes-xts-plain64 (label: the fixed word, not the profile's name);
# (b) a header rewritten to cipher_null-ecb in both metadata copies with their checksums
#     fixed (libcryptsetup still reads it), pinned by hand and put on the server, is refused
#     with exit 6 naming the cipher, and nothing is left open;
# (c) the server (as backupuser) flips one ciphertext byte in FORMAT's inode, in the
#     inode-table block that also holds snapshots/: `run` and `snapshots` exit 6 calling it
#     damage, and `verify` exits 6;
# (d) a victim file outside the tool's own is unchanged (sha256 and size).
source "$(dirname "$0")/../lib/common.sh"

P=hdrtrust
C=$SERVER_DIR/$P.luks
H=$DEMO_DIR/$P.key.header
SRC=/srv/hdrtrust-data
VICTIM=/var/lib/e2e-hdrtrust-victim.bin
E2E() { "$E2E_BIN" "$@"; }
AS_SERVER() { setpriv --reuid=backupuser --regid=backupuser --clear-groups "$@"; }

setup() {
  scenario_profile $P 128M "$SRC" &&
  mkdir -p "$SRC" && echo "precious" > "$SRC/file" &&
  head -c 4096 /dev/urandom > "$VICTIM" && chmod 0644 "$VICTIM"
}
victim_sum() { echo "$(sha256sum < "$VICTIM" | cut -d' ' -f1) $(stat -c %s "$VICTIM")"; }
# Exit status $1 and a message matching $2 from the rest of the line, run as root.
expect() {
  local want=$1 pat=$2; shift 2
  local out rc
  out=$("$@" 2>&1); rc=$?
  echo "$out" | tail -n 6
  [ "$rc" = "$want" ] || { echo "exit $rc, wanted $want"; return 1; }
  echo "$out" | grep -q -- "$pat" || { echo "no line matching: $pat"; return 1; }
}

# (a)
server_equals_pinned() { cmp -n "$(stat -c %s "$H")" "$H" "$C"; }
pinned_params() {
  local d; d=$(cryptsetup luksDump "$H") || return 1
  echo "$d" | grep -E 'cipher:|sector:|Label:|PBKDF:' | sort -u
  echo "$d" | grep -Eq 'cipher: +aes-xts-plain64' &&
  ! echo "$d" | grep -Ev 'cipher: +aes-xts-plain64' | grep -q 'cipher:' &&
  echo "$d" | grep -Eq 'Label:[[:space:]]+e2ebackup$'
}

# (b) Rewrite the segment's cipher in both metadata copies of header file $1 (its first
# 2 x hdr_size bytes) and recompute each copy's SHA-256 checksum, as an attacker would.
forge_cipher_null() {
  python3 - "$1" <<'EOF'
import hashlib, struct, sys
path = sys.argv[1]
with open(path, "r+b") as f:
    b = bytearray(f.read(1 << 20))
    hs = struct.unpack(">Q", b[8:16])[0]
    for at in (0, hs):
        area = b[at:at + hs]
        js = area[4096:]
        k = js.index(b"aes-xts-plain64", js.index(b'"segments"'))
        js[k:k + 15] = b"cipher_null-ecb"
        area[4096:] = js
        area[448:512] = bytes(64)
        area[448:480] = hashlib.sha256(bytes(area)).digest()
        b[at:at + hs] = area
    f.seek(0)
    f.write(b[:2 * hs])
EOF
}
hdr_bytes() { echo $(( 2 * $(od -An -j8 -N8 -tu1 "$H" | awk '{v=0; for(i=1;i<=NF;i++) v=v*256+$i; print v}') )); }
forge_both() {
  cp -p "$H" /srv/hdrtrust-header.orig &&
  dd if="$C" of=/srv/hdrtrust-server-head.orig bs=1M count=2 status=none &&
  forge_cipher_null "$H" &&
  # The server's copy: the same forged metadata, written by the server's user.
  head -c "$(hdr_bytes)" "$H" | AS_SERVER dd of="$C" conv=notrunc status=none &&
  cryptsetup luksDump "$H" | grep -E 'cipher: +cipher_null-ecb'
}
unforge() {
  cp -p /srv/hdrtrust-header.orig "$H" &&
  AS_SERVER dd if=/srv/hdrtrust-server-head.orig of="$C" conv=notrunc status=none &&
  server_equals_pinned
}

# (c) Where FORMAT's inode lives in the container file (data offset + block x 4096 + its
# offset in the block), found through a read-only mapping opened by hand.
format_inode_offset() {
  local L im blk ioff off
  L=$(losetup -f --show --read-only "$C") || return 1
  cryptsetup open --readonly --header "$H" --key-file "$DEMO_DIR/$P.key" "$L" hdrview || { losetup -d "$L"; return 1; }
  im=$(debugfs -R "imap /FORMAT" /dev/mapper/hdrview 2>/dev/null)
  debugfs -R "imap /snapshots" /dev/mapper/hdrview 2>/dev/null | grep located >&2
  cryptsetup close hdrview; losetup -d "$L"
  echo "$im" | grep located >&2
  blk=$(echo "$im" | awk '/located at block/ {gsub(",", "", $4); print $4}')
  ioff=$(echo "$im" | awk '/located at block/ {print $6}')
  off=$(cryptsetup luksDump "$H" | awk '/offset:/ && /bytes/ {print $2; exit}')
  [ -n "$blk" ] && [ -n "$ioff" ] && [ -n "$off" ] || return 1
  echo $(( off + blk * 4096 + ioff + 40 ))
}
flip_as_server() {
  local b; b=$(dd if="$C" bs=1 skip="$1" count=1 2>/dev/null | od -An -tu1 | tr -d ' ')
  printf "\\$(printf '%03o' $(( (b ^ 1) & 255 )))" | AS_SERVER dd of="$C" bs=1 seek="$1" conv=notrunc status=none
}

check setup setup
BEFORE=$(victim_sum)
T0=$(_uptime)
check init E2E init $P
metric init_s "$(awk -v a="$T0" -v b="$(_uptime)" 'BEGIN{printf "%.1f", b-a}')"
check a-server-header-equals-pinned server_equals_pinned
check a-pinned-header-is-aes-xts pinned_params
check run E2E run $P

check b-forge-cipher-null-both-copies forge_both
check b-forged-header-exits-6-naming-cipher expect 6 "segment cipher is cipher_null-ecb, e2ebackup only opens aes-xts-plain64" "$E2E_BIN" run $P
check b-no-leftovers assert_no_leftovers
check b-restore-header unforge

OFF=$(format_inode_offset); echo "FORMAT's inode at container offset $OFF"
check c-found-format-inode test -n "$OFF"
check c-flip-byte-as-server flip_as_server "$OFF"
check c-run-says-damage expect 6 "filesystem is damaged" "$E2E_BIN" run $P
check c-snapshots-says-damage expect 6 "server altered or lost data" "$E2E_BIN" snapshots $P
check c-verify-exits-6 expect 6 "damaged" "$E2E_BIN" verify $P
check c-no-leftovers assert_no_leftovers
check d-victim-unchanged test "$(victim_sum)" = "$BEFORE"
metric total_s "$(awk -v a="$T0" -v b="$(_uptime)" 'BEGIN{printf "%.1f", b-a}')"
