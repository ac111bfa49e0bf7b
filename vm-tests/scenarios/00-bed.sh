#!/bin/bash
# timeout: 300
# Proves the bed: modules, sshd on loopback, sshfs, a direct-I/O loop device on a file on
# that mount, LUKS2 format/open, ext4 inside, a checksum round trip, a clean teardown.
source "$(dirname "$0")/../lib/common.sh"
MNT=/mnt/bed-sshfs; FS=/mnt/bed-fs; KEY=/run/bed.key
SSH_OPTS=(-F /dev/null -i "$DEMO_DIR/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes
  -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$DEMO_DIR/known_hosts")

check modules-loaded bash -c 'for m in dm_crypt loop fuse nbd ext4; do grep -q "^$m " /proc/modules || [ -d /sys/module/$m ] || exit 1; done'
check sshd-answers-on-loopback bash -c "[ \"\$(ssh ${SSH_OPTS[*]} backupuser@127.0.0.1 id -un)\" = backupuser ]"
mkdir -p "$MNT" "$FS"
check sshfs-mounts sshfs -F /dev/null -o "IdentityFile=$DEMO_DIR/id_ed25519,IdentitiesOnly=yes,UserKnownHostsFile=$DEMO_DIR/known_hosts,StrictHostKeyChecking=yes,BatchMode=yes,ServerAliveInterval=15" backupuser@127.0.0.1:/srv/backup "$MNT"
check sshfs-is-fuse test "$(findmnt -n -o FSTYPE "$MNT")" = fuse.sshfs
check sparse-file truncate -s 256M "$MNT/bed.img"
LOOP=$(losetup -f --show --direct-io=on "$MNT/bed.img")
check loop-direct-io test "$(losetup -n -O DIO "$LOOP" | tr -d ' ')" = 1
head -c 4096 /dev/urandom > "$KEY"; chmod 0400 "$KEY"
check luks-format cryptsetup luksFormat -q --type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file "$KEY" "$LOOP"
check luks-open cryptsetup open --key-file "$KEY" "$LOOP" bed
check mkfs-ext4 mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/bed
check mount-ext4 mount /dev/mapper/bed "$FS"
head -c 3M /dev/urandom > /tmp/bed-data
SUM=$(sha256sum < /tmp/bed-data)
cp /tmp/bed-data "$FS/data"; sync
echo 3 > /proc/sys/vm/drop_caches
check checksum-round-trip test "$(sha256sum < "$FS/data")" = "$SUM"
check umount-ext4 umount "$FS"
check luks-close cryptsetup close bed
check loop-detach losetup -d "$LOOP"
metric bed_server_alloc_bytes "$(alloc_bytes /srv/backup/bed.img)"
check server-file-is-sparse test "$(alloc_bytes /srv/backup/bed.img)" -lt $((64 << 20))
check sshfs-unmount fusermount3 -u "$MNT"
sleep 0.5
rm -f /srv/backup/bed.img
check no-leftovers assert_no_leftovers
