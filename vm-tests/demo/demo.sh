#!/bin/bash
# timeout: 900
# The README's demo: e2ebackup end to end inside the VM, against the VM's own sshd
# (the "untrusted server", a user `backupuser` with storage on its own disk).
source "$(dirname "$0")/../lib/common.sh"

P=demo
DATA=/srv/demo-data
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "the profile (/etc/e2ebackup/profiles/$P.yaml)"
install -D -m 0600 "$E2E_REPO/profiles/demo.yaml" /etc/e2ebackup/profiles/$P.yaml
cat /etc/e2ebackup/profiles/$P.yaml

say "some data to protect in $DATA"
mkdir -p "$DATA/alice/docs" "$DATA/bob"
for i in $(seq 1 20); do head -c $((i * 4096)) /dev/urandom > "$DATA/alice/docs/report$i.pdf"; done
echo "my secret plans" > "$DATA/bob/plans.txt"
du -sh "$DATA"

say "e2ebackup validate $P"
check validate "$E2E_BIN" validate $P
say "e2ebackup init $P  (creates the LUKS2 container on the server)"
check init "$E2E_BIN" init $P
say "e2ebackup run $P   (first snapshot)"
check run-1 "$E2E_BIN" run $P
say "change some files, then e2ebackup run $P again"
echo "revised plans" > "$DATA/bob/plans.txt"; rm "$DATA/alice/docs/report3.pdf"
check run-2 "$E2E_BIN" run $P
say "e2ebackup status $P"
check status "$E2E_BIN" status $P

say "what the server sees in $SERVER_DIR"
ls -ls "$SERVER_DIR"
echo "allocated on the server: $(( $(alloc_bytes "$SERVER_DIR/demo.luks") / 1048576 )) MiB of a $(( $(stat -c %s "$SERVER_DIR/demo.luks") / 1048576 )) MiB sparse file"
# Read only the allocated extents of the sparse file (SEEK_DATA/SEEK_HOLE): grepping 2 GiB
# of holes takes minutes under emulation.
no_plaintext() {
  python3 - "$SERVER_DIR/demo.luks" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
end = os.fstat(fd).st_size
off, scanned = 0, 0
while off < end:
    try:
        start = os.lseek(fd, off, os.SEEK_DATA)
    except OSError:
        break
    stop = os.lseek(fd, start, os.SEEK_HOLE)
    os.lseek(fd, start, os.SEEK_SET)
    data = os.read(fd, stop - start)
    scanned += len(data)
    if b"secret plans" in data:
        sys.exit("plaintext found on the server!")
    off = stop
print(f"scanned {scanned} allocated bytes: no plaintext")
PY
}
check server-sees-no-plaintext no_plaintext
echo "searching the container for 'secret plans': not found (ciphertext only)"

say "what the client can open (by hand, as docs/layout.md shows)"
L=$(losetup -f --show --read-only --direct-io=on "$SERVER_DIR/demo.luks")
cryptsetup open --readonly --key-file "$DEMO_DIR/container.key" "$L" demo-view
mkdir -p /mnt/view && mount -o ro /dev/mapper/demo-view /mnt/view
ls -l /mnt/view/snapshots
for s in /mnt/view/snapshots/*; do echo "$(basename "$s"): $(cat "$s$DATA/bob/plans.txt")"; done
check two-snapshots test "$(ls /mnt/view/snapshots | wc -l)" = 2
umount /mnt/view; cryptsetup close demo-view; losetup -d "$L"
check nothing-left-mounted assert_no_leftovers
