#!/bin/bash
# Once per boot, before the scenarios: kernel modules, and the "backup server" on guest
# loopback: sshd with its own host key, user `backupuser` with an authorized key, storage on
# its own sparse virtio disk (ext4) so allocation "on the server" is real and measurable.
# Client-side demo credentials go to /etc/e2ebackup/demo.
set -euo pipefail
OUT=${E2E_OUT:-/e2e/out}
SSHD_DIR=/run/e2e-sshd
DEMO_DIR=/etc/e2ebackup/demo

# No udev: nothing loads modules by modalias, so load what the stack needs by hand.
for m in virtio_blk dm_mod dm_crypt loop fuse nbd ext4 xts algif_skcipher; do modprobe "$m"; done
modprobe aesni_intel 2>/dev/null || echo "setup: aesni_intel not available (no AES-NI in the guest CPU)"
for i in $(seq 1 100); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || { echo "setup: /dev/vda did not appear"; exit 1; }
[ -e /dev/loop-control ] && [ -e /dev/mapper/control ] && [ -e /dev/fuse ]

# Server storage.
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -L server /dev/vda
mkdir -p /srv && mount -o noinit_itable /dev/vda /srv
id backupuser >/dev/null 2>&1 || useradd -m -d /home/backupuser -s /bin/bash backupuser
# New accounts have a locked password ("!"); with UsePAM no, sshd refuses locked accounts.
usermod -p '*' backupuser
install -d -m 0700 -o backupuser -g backupuser /srv/backup

# Keys.
mkdir -p "$SSHD_DIR" /run/sshd "$DEMO_DIR" /etc/e2ebackup/profiles
chmod 0755 /run/sshd; chmod 0700 "$DEMO_DIR"
ssh-keygen -q -t ed25519 -N '' -C e2e-server -f "$SSHD_DIR/ssh_host_ed25519_key"
ssh-keygen -q -t ed25519 -N '' -C e2e-client -f "$DEMO_DIR/id_ed25519"
install -d -m 0700 -o backupuser -g backupuser /home/backupuser/.ssh
install -m 0600 -o backupuser -g backupuser "$DEMO_DIR/id_ed25519.pub" /home/backupuser/.ssh/authorized_keys
cat > "$SSHD_DIR/sshd_config" <<EOC
ListenAddress 127.0.0.1
Port 22
HostKey $SSHD_DIR/ssh_host_ed25519_key
PidFile $SSHD_DIR/sshd.pid
AuthorizedKeysFile .ssh/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin no
AllowUsers backupuser
UsePAM no
StrictModes yes
# trim forwards a Unix socket, no TCP; OpenSSH's sshd still grants local forwards of both
# kinds only under AllowTcpForwarding (with `no`, it denies the socket too: measured).
AllowTcpForwarding local
AllowStreamLocalForwarding local
X11Forwarding no
Subsystem sftp internal-sftp
LogLevel VERBOSE
EOC
/usr/sbin/sshd -t -f "$SSHD_DIR/sshd_config"
/usr/sbin/sshd -f "$SSHD_DIR/sshd_config" -E "$OUT/sshd.log"
echo "127.0.0.1 $(cut -d' ' -f1,2 "$SSHD_DIR/ssh_host_ed25519_key.pub")" > "$DEMO_DIR/known_hosts"
for i in $(seq 1 50); do
  ssh -F /dev/null -i "$DEMO_DIR/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes \
    -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$DEMO_DIR/known_hosts" \
    backupuser@127.0.0.1 true 2>/dev/null && break
  sleep 0.2
done
echo "setup: sshd up on 127.0.0.1:22, server storage $(df -h --output=size /srv | tail -1) on /dev/vda"
