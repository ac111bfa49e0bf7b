#!/bin/bash
# timeout: 1200
# Issue 14, a server that offers only SFTP: a chrooted account (ChrootDirectory, ForceCommand
# internal-sftp, shell nologin), the way careful admins and hosted storage give backup
# accounts. sshd refuses any command on it and, at DEBUG1 for this account, logs each channel
# request ("req exec" or "req subsystem"; one ssh command is the positive control). On it:
# validate --connect, init, run and grow report the server's free space (never "cannot
# tell"); two runs, an online grow, then a run with a literal source of `/` (one_file_system
# off, the default; the profile excludes the big top-level trees but not /proc, /sys, /dev,
# /run, where the sshfs mount of this very container and the mounted container are), whose
# restore has the source tree identical, those four empty and no copy of the container;
# init against a 64M tmpfs is refused with the numbers, creating nothing. sshd's log shows
# subsystem requests only. Then trim refuses, naming the SFTP-only account (exit 1). Last, the
# guest kernel's side of tests/host_crash_noload.rs.
source "$(dirname "$0")/../lib/common.sh"

U=sftponly
JAIL=/srv/jail                     # root-owned chroot; the account sees /backup and /small
P=sftp
SMALL=sftpsmall
SRC=/e2e-sftp-src                  # top level: the one tree the `/` profile keeps
R=/srv/sftp-restore
SSHLOG=$E2E_OUT/sshd.log
LOG=$E2E_OUT/87-sftp-only.log
E2E() { "$E2E_BIN" "$@"; }
# sftp_profile NAME SERVER-PATH SOURCE: the scenario profile, on the SFTP-only account.
sftp_profile() {
  scenario_profile "$1" 256M "$3"
  sed -i -e "s/user: backupuser/user: $U/" -e "s#path: $SERVER_DIR#path: $2#" "/etc/e2ebackup/profiles/$1.yaml"
}

setup() {
  id $U >/dev/null 2>&1 || useradd -m -d /home/$U -s /usr/sbin/nologin $U || return 1
  usermod -p '*' $U
  install -d -m 0700 -o $U -g $U /home/$U/.ssh
  install -m 0600 -o $U -g $U "$DEMO_DIR/id_ed25519.pub" /home/$U/.ssh/authorized_keys
  install -d -m 0755 -o root -g root $JAIL $JAIL/small
  install -d -m 0700 -o $U -g $U $JAIL/backup
  mount -t tmpfs -o size=64m,mode=0700,uid="$(id -u $U)",gid="$(id -g $U)" e2e-small $JAIL/small || return 1
  cp "$SSHD_DIR/sshd_config" "$SSHD_DIR/sshd_config.orig"
  sed -i "s/^AllowUsers .*/AllowUsers backupuser $U/" "$SSHD_DIR/sshd_config"
  cat >> "$SSHD_DIR/sshd_config" <<EOC
Match User $U
  ChrootDirectory $JAIL
  ForceCommand internal-sftp
  AllowTcpForwarding no
  LogLevel DEBUG1
EOC
  /usr/sbin/sshd -t -f "$SSHD_DIR/sshd_config" && _restart_sshd || return 1
  sftp_profile $P /backup "$SRC"
  sftp_profile $SMALL /small "$SRC"
  mkdir -p "$SRC/d"
  for i in 1 2 3; do head -c 300000 /dev/urandom > "$SRC/d/f$i"; done
  echo one > "$SRC/file"; ln "$SRC/d/f1" "$SRC/d/hard"; ln -s ../file "$SRC/d/link"
}
check setup setup

# The channel requests sshd logged for the account since line $1 of its log: "exec",
# "shell", "subsystem" (sshd's own "refusing non-sftp session" is lost: the session child
# closes the log file before it refuses).
requests() { tail -n +"$(($1 + 1))" "$SSHLOG" | grep -oE 'session_input_channel_req: session [0-9]+ req [a-z@.-]+' | awk '{print $NF}'; }
# Positive control: a command on the account is refused, and sshd logs its request.
control() {
  local l0; l0=$(wc -l < "$SSHLOG")
  timeout 60 ssh -F /dev/null -i "$DEMO_DIR/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes \
    -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$DEMO_DIR/known_hosts" \
    $U@127.0.0.1 stat /backup < /dev/null
  local rc=$?; echo "ssh exit $rc"; sleep 0.5
  requests "$l0" | sort | uniq -c
  [ "$rc" != 0 ] && requests "$l0" | grep -qx exec
}
check control-a-command-is-refused-and-logged control

L0=$(wc -l < "$SSHLOG")
# say NAME PATTERN CMD...: CMD exits 0, its output has PATTERN and no "cannot tell".
say() {
  local name=$1 pat=$2; shift 2
  "$@" > "$LOG.$name" 2>&1; local rc=$?
  cat "$LOG.$name"; metric "$name.exit" "$rc"
  [ "$rc" = 0 ] && grep -qE "$pat" "$LOG.$name" && ! grep -q 'cannot tell' "$LOG.$name"
}
check validate-connect-reports-free say validate 'free [0-9.]+ ?[KMGT]' E2E validate $P --connect
check init-reports-free say init "127.0.0.1:/backup has [0-9.]+ ?[KMGT]i?B? free; init writes about" E2E init $P
check run-1-reports-free say run1 'has [0-9.]+ ?[KMGT]i?B? free; the container can grow' E2E run $P
echo two > "$SRC/file2"; head -c 100000 /dev/urandom > "$SRC/d/f2"
check run-2 say run2 'snapshot [0-9TZ]+ committed' E2E run $P
check grow-reports-free say grow "127.0.0.1:/backup has [0-9.]+ ?[KMGT]i?B? free; growing by" E2E grow $P --size 320M --online
check grown bash -c "[ \$(stat -c %s $JAIL/backup/$P.luks) = $((320 << 20)) ]"


# A source of `/`: the profile excludes every big top-level tree, but not /proc, /sys, /dev,
# /run (where the sshfs mount of this very container and the mounted container are).
root_profile() {
  local ex="" d
  shopt -s dotglob
  for d in /*; do
    case "$d" in /proc|/sys|/dev|/run|$SRC) ;; *) ex="$ex\"$d\", " ;; esac
  done
  shopt -u dotglob
  sed -i -e "s#sources: .*#sources: [/]#" "/etc/e2ebackup/profiles/$P.yaml"
  sed -i -e "/^backup:/a\\  excludes: [${ex%, }]" "/etc/e2ebackup/profiles/$P.yaml"
  cat "/etc/e2ebackup/profiles/$P.yaml"
}
check root-profile root_profile
check run-source-root say runroot 'snapshot [0-9TZ]+ committed' E2E run $P
# Restored: the source tree identical, /proc, /sys, /dev and /run empty, no container.
root_restored() {
  rm -rf $R && mkdir $R && E2E restore $P latest $R || return 1
  local ok=0 d n
  ls -A $R
  diff -r --no-dereference "$SRC" "$R$SRC" || ok=1
  [ "$(stat -c %i "$R$SRC/d/f1")" = "$(stat -c %i "$R$SRC/d/hard")" ] || { echo "hard link lost"; ok=1; }
  for d in /proc /sys /dev /run; do
    n=$(ls -A "$R$d" 2>/dev/null | wc -l); echo "$d in the snapshot: $n entries"
    [ -d "$R$d" ] && [ "$n" = 0 ] || ok=1
  done
  n=$(find $R -xdev -name "*.luks*" | wc -l); echo "container copies: $n"; [ "$n" = 0 ] || ok=1
  n=$(du -sk $R | cut -f1); echo "snapshot: $n KiB"; metric root_snapshot_kib "$n"; [ "$n" -lt 4096 ] || ok=1
  return $ok
}
check restore-of-root-identical-without-pseudo-fs-or-container root_restored
# init against 64M free: refused with the numbers before anything is created.
small_refused() {
  E2E init $SMALL > "$LOG.small" 2>&1; local rc=$?
  cat "$LOG.small"; metric small_init.exit "$rc"
  [ "$rc" = 1 ] && grep -qE "127.0.0.1:/small has 64M free; init writes about [0-9.]+[KMG] .* wants 64M more to spare" "$LOG.small" &&
    [ -z "$(ls -A $JAIL/small)" ] && [ ! -e "$DEMO_DIR/$SMALL.key" ] && [ ! -e "$DEMO_DIR/$SMALL.key.header" ]
}
check init-refuses-a-small-server small_refused
no_command_ran() {
  local r; r=$(requests "$L0")
  echo "$r" | sort | uniq -c
  local sftp other
  sftp=$(echo "$r" | grep -cx subsystem); other=$(echo "$r" | grep -cvx 'subsystem\|env\|keepalive@openssh.com\|')
  echo "subsystem requests: $sftp, other (exec, shell...): $other"
  metric sftp_sessions "$sftp"; metric command_requests "$other"
  [ "$sftp" -gt 0 ] && [ "$other" = 0 ]
}
check no-remote-command-ran no_command_ran
only_our_files() {
  local l; l=$(ls -A $JAIL/backup | sort | tr '\n' ' '); echo "server dir: $l"
  [ "$l" = "$P.luks " ] || [ "$l" = "$P.luks $P.luks.escrow.age " ]
}
check server-holds-only-the-container only_our_files
trim_refuses() {
  E2E trim $P > "$LOG.trim" 2>&1; local rc=$?
  cat "$LOG.trim"; metric trim.exit "$rc"
  [ "$rc" = 1 ] && grep -q "cannot run commands (an SFTP-only account?)" "$LOG.trim" && ! grep -q nbdkit: "$LOG.trim"
}
check trim-refuses-sftp-only trim_refuses

# The guest kernel's side of tests/host_crash_noload.rs (what generation::commit relies on):
# STATE replaced as fsutil::write_atomic does (tmp, fsync, rename, fsync dir), then syncfs;
# an image copied while mounted needs recovery, and ro,noload shows the new STATE. Without
# the syncfs it shows the old one.
noload_after_commit() {
  local d=/srv/noload-t; rm -rf $d; mkdir -p $d/m $d/c
  truncate -s 64M $d/img && mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 $d/img || return 1
  mount -o loop $d/img $d/m && echo 4 > $d/m/STATE && umount $d/m || return 1
  commit() { # GEN SYNCFS
    python3 -c '
import ctypes, os, sys
m, gen, sync = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
with open(m + "/.STATE.tmp", "w") as f:
    f.write(gen + "\n"); f.flush(); os.fsync(f.fileno())
os.rename(m + "/.STATE.tmp", m + "/STATE")
d = os.open(m, os.O_RDONLY); os.fsync(d)
if sync and ctypes.CDLL(None, use_errno=True).syncfs(d) != 0: sys.exit("syncfs failed")
' $d/m "$1" "$2"
  }
  seen() { mount -o loop,ro,noload $d/crash $d/c && cat $d/c/STATE && umount $d/c; }
  local a b
  mount -o loop $d/img $d/m && commit 5 1 && cp --sparse=always $d/img $d/crash && umount $d/m || return 1
  a=$(seen) || return 1
  mount -o loop $d/img $d/m && commit 6 0 && cp --sparse=always $d/img $d/crash && umount $d/m || return 1
  b=$(seen) || return 1
  echo "noload view after write_atomic+syncfs of 5: $a; after write_atomic alone of 6: $b"
  rm -rf $d
  [ "$a" = 5 ] && [ "$b" = 5 ]
}
check crash-image-after-commit-shows-it-under-noload noload_after_commit

check no-leftovers assert_no_leftovers


restore_sshd() {
  mv -f "$SSHD_DIR/sshd_config.orig" "$SSHD_DIR/sshd_config" && _restart_sshd &&
    umount $JAIL/small && rm -rf "$SRC" $R
}
check restore-sshd restore_sshd
