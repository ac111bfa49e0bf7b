#!/bin/bash
# timeout: 900
# Issue 14, a server that offers only SFTP: a chrooted account (ChrootDirectory, ForceCommand
# internal-sftp, shell nologin), the way careful admins and hosted storage give backup
# accounts. sshd refuses any command on it ("refusing non-sftp session" in its log, checked
# with one ssh command as the positive control), so the log proves that validate --connect,
# init, two runs, restore and grow ran none; each reports the server's free space (no "cannot
# tell"). trim refuses, naming the SFTP-only account. init refuses a server with less space
# than it writes (a 64M tmpfs in the chroot), with the numbers, creating nothing.
# Then a literal source of `/` (one_file_system off, the default) with the profile's excludes
# covering the big top-level trees but not /proc, /sys, /dev, /run: the run's own exclusions
# keep their contents and the container out of the snapshot.
source "$(dirname "$0")/../lib/common.sh"

U=sftponly
JAIL=/srv/jail                     # root-owned chroot; the account sees /backup and /small
P=sftp
SMALL=sftpsmall
SRC=/srv/sftp-src
ROOTDATA=/e2e-rootdata             # the one top-level tree the `/` profile keeps
SSHLOG=$E2E_OUT/sshd.log
LOG=$E2E_OUT/87-sftp-only.log
E2E() { "$E2E_BIN" "$@"; }
ids() { "$E2E_BIN" snapshots "$1" 2>/dev/null | grep -oE '[0-9]{8}T[0-9]{6}Z' | sort -u; }
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
EOC
  /usr/sbin/sshd -t -f "$SSHD_DIR/sshd_config" && _restart_sshd || return 1
  sftp_profile $P /backup "$SRC"
  sftp_profile $SMALL /small "$SRC"
  mkdir -p "$SRC/d"
  for i in 1 2 3; do head -c 300000 /dev/urandom > "$SRC/d/f$i"; done
  echo one > "$SRC/file"; ln "$SRC/d/f1" "$SRC/d/hard"; ln -s ../file "$SRC/d/link"
}
check setup setup

# Positive control: a command on the account is refused, and sshd logs it.
control() {
  local l0; l0=$(wc -l < "$SSHLOG")
  timeout 60 ssh -F /dev/null -i "$DEMO_DIR/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes \
    -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$DEMO_DIR/known_hosts" \
    $U@127.0.0.1 stat /backup < /dev/null
  local rc=$?; echo "ssh exit $rc"; sleep 0.5
  tail -n +"$((l0 + 1))" "$SSHLOG" | grep 'refusing non-sftp session'
  [ "$rc" != 0 ] && tail -n +"$((l0 + 1))" "$SSHLOG" | grep -q 'refusing non-sftp session'
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
restored() {
  rm -rf /srv/sftp-restore && mkdir /srv/sftp-restore && E2E restore $P latest /srv/sftp-restore &&
    diff -r --no-dereference "$SRC" "/srv/sftp-restore$SRC" &&
    [ "$(stat -c %i "/srv/sftp-restore$SRC/d/f1")" = "$(stat -c %i "/srv/sftp-restore$SRC/d/hard")" ]
}
check restore-identical restored
check grow-reports-free say grow "127.0.0.1:/backup has [0-9.]+ ?[KMGT]i?B? free; growing by" E2E grow $P --size 320M
check grown bash -c "[ \$(stat -c %s $JAIL/backup/$P.luks) = $((320 << 20)) ]"
no_command_ran() {
  local new; new=$(tail -n +"$((L0 + 1))" "$SSHLOG")
  local sftp refused
  sftp=$(echo "$new" | grep -c "subsystem request for sftp by user $U")
  refused=$(echo "$new" | grep -c 'refusing non-sftp session')
  echo "sftp subsystem sessions: $sftp, refused commands: $refused"
  metric sftp_sessions "$sftp"; metric refused_commands "$refused"
  [ "$sftp" -gt 0 ] && [ "$refused" = 0 ]
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
L0=$(wc -l < "$SSHLOG")   # trim's own command (refused) is before this line

# init against 64M free: refused with the numbers before anything is created.
small_refused() {
  E2E init $SMALL > "$LOG.small" 2>&1; local rc=$?
  cat "$LOG.small"; metric small_init.exit "$rc"
  [ "$rc" = 1 ] && grep -qE "127.0.0.1:/small has [0-9.]+ ?[KMGT]i?B? free; init writes about" "$LOG.small" &&
    [ -z "$(ls -A $JAIL/small)" ] && [ ! -e "$DEMO_DIR/$SMALL.key" ] && [ ! -e "$DEMO_DIR/$SMALL.key.header" ]
}
check init-refuses-a-small-server small_refused

# A source of `/`: the profile excludes every big top-level tree, but not /proc, /sys, /dev,
# /run (where the sshfs mount of this very container and the mounted container are).
root_profile() {
  mkdir -p $ROOTDATA && echo root-kept > $ROOTDATA/kept
  local ex="" d
  shopt -s dotglob
  for d in /*; do
    case "$d" in /proc|/sys|/dev|/run|$ROOTDATA) ;; *) ex="$ex\"$d\", " ;; esac
  done
  shopt -u dotglob
  sed -i -e "s#sources: .*#sources: [/]#" "/etc/e2ebackup/profiles/$P.yaml"
  sed -i -e "/^backup:/a\\  excludes: [${ex%, }]" "/etc/e2ebackup/profiles/$P.yaml"
  cat "/etc/e2ebackup/profiles/$P.yaml"
}
check root-profile root_profile
check run-source-root say runroot 'snapshot [0-9TZ]+ committed' E2E run $P
root_snapshot() {
  local id; id=$(ids $P | tail -1)
  mkdir -p /mnt/sftp && E2E mount $P /mnt/sftp || return 1
  local s=/mnt/sftp/$id ok=0 d n
  ls -A "$s"
  [ "$(cat "$s$ROOTDATA/kept" 2>/dev/null)" = root-kept ] || { echo "$ROOTDATA/kept missing"; ok=1; }
  for d in /proc /sys /dev /run; do
    n=$(ls -A "$s$d" 2>/dev/null | wc -l); echo "$d in the snapshot: $n entries"
    [ -d "$s$d" ] && [ "$n" = 0 ] || ok=1
  done
  n=$(find "$s" -xdev -name "*.luks*" | wc -l); echo "container copies: $n"; [ "$n" = 0 ] || ok=1
  n=$(du -sk "$s" | cut -f1); echo "snapshot: $n KiB"; metric root_snapshot_kib "$n"; [ "$n" -lt 4096 ] || ok=1
  E2E umount $P || ok=1
  return $ok
}
check root-snapshot-holds-no-pseudo-fs-or-container root_snapshot
check root-run-ran-no-command no_command_ran
check no-leftovers assert_no_leftovers

restore_sshd() {
  mv -f "$SSHD_DIR/sshd_config.orig" "$SSHD_DIR/sshd_config" && _restart_sshd &&
    umount $JAIL/small && rm -rf "$SRC" /srv/sftp-restore $ROOTDATA
}
check restore-sshd restore_sshd
