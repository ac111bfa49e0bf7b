#!/bin/bash
# Sourced by every scenario. Provides:
#   check NAME CMD...     run CMD; record PASS/FAIL NAME with seconds; go on either way
#   fail MSG              record a failure without a command
#   metric KEY VALUE      append to $E2E_OUT/metrics.txt (and print)
#   alloc_bytes FILE      bytes allocated to FILE (st_blocks * 512)
#   assert_no_leftovers   fails unless no sshfs/e2ebackup mount, dm mapping, loop device,
#                         NBD connection, sshfs, ssh, nbd-client or nbdkit process is left
#   server_rotate_hostkey / server_restore_hostkey   give sshd another host key and back
#   scenario_profile NAME SIZE SOURCE [RETENTION]      write /etc/e2ebackup/profiles/NAME.yaml
# and the variables E2E_BIN, E2E_REPO, E2E_OUT, SERVER_DIR, DEMO_DIR, SSHD_DIR.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
E2E_OUT=${E2E_OUT:-/e2e/out}
E2E_REPO=${E2E_REPO:-/e2e/repo}
E2E_BIN=${E2E_BIN:-$E2E_OUT/e2ebackup}
SERVER_DIR=/srv/backup
DEMO_DIR=/etc/e2ebackup/demo
SSHD_DIR=/run/e2e-sshd
_SCEN=${E2E_SCENARIO:-$(basename "$0" .sh)}
_CHECKS=$E2E_OUT/checks/$_SCEN.txt
mkdir -p "$E2E_OUT/checks"

_uptime() { cut -d' ' -f1 /proc/uptime; }

check() {
  local name=$1; shift
  local a b rc
  a=$(_uptime)
  echo "[$(_uptime)] >>> $name: $*"
  "$@"; rc=$?
  b=$(_uptime)
  local secs; secs=$(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.1f", b-a}')
  if [ $rc -eq 0 ]; then
    echo "PASS $name ${secs}s" | tee -a "$_CHECKS"
  else
    echo "FAIL $name ${secs}s (exit $rc)" | tee -a "$_CHECKS"
  fi
  return 0
}

fail() { echo "FAIL $*" | tee -a "$_CHECKS"; }

metric() { echo "$_SCEN.$1 $2" | tee -a "$E2E_OUT/metrics.txt"; }

alloc_bytes() { echo $(( $(stat -c %b "$1") * $(stat -c %B "$1") )); }

assert_no_leftovers() {
  local bad=0 m
  m=$(awk '$3 ~ /^fuse\.sshfs$/ || $2 ~ /^\/run\/e2ebackup\// {print $2" ("$3")"}' /proc/mounts)
  [ -n "$m" ] && { echo "leftover mounts: $m"; bad=1; }
  m=$(dmsetup ls 2>&1)
  case "$m" in *"No devices found"*) ;; *) echo "leftover device-mapper mappings: $m"; bad=1 ;; esac
  m=$(losetup -a)
  [ -n "$m" ] && { echo "leftover loop devices: $m"; bad=1; }
  for d in /sys/block/nbd*; do
    [ -e "$d/pid" ] && { echo "leftover NBD connection: /dev/$(basename "$d")"; bad=1; }
  done
  for p in sshfs ssh nbd-client nbdkit e2ebackup rsync; do
    if pgrep -x "$p" >/dev/null; then echo "leftover process $p: $(pgrep -a -x "$p")"; bad=1; fi
  done
  return $bad
}

# bg_until PATTERN LOG CMD...: start CMD in the background, its output in LOG; return 0 once
# PATTERN (grep) is in LOG, 1 if CMD ended first or 180 s passed. Its pid is in $BG_PID.
bg_until() {
  local pat=$1 log=$2 i; shift 2
  "$@" >"$log" 2>&1 & BG_PID=$!
  for i in $(seq 1 900); do
    grep -q -- "$pat" "$log" && return 0
    kill -0 "$BG_PID" 2>/dev/null || return 1
    sleep 0.2
  done
  return 1
}

# scenario_profile NAME SIZE SOURCE [RETENTION-LINES]: a profile NAME.yaml for the guest's
# server, container NAME.luks, keyfile $DEMO_DIR/NAME.key, one source directory.
scenario_profile() {
  local name=$1 size=$2 src=$3 ret=${4:-}
  sed -e "s/file: demo.luks/file: $name.luks/" -e "s/size: 2G/size: $size/" \
      -e "s#keyfile: .*#keyfile: $DEMO_DIR/$name.key#" -e "s#sources: .*#sources: [$src]#" \
      -e '/excludes:/d' -e '/^retention:/,$d' "$E2E_REPO/profiles/demo.yaml" > "/etc/e2ebackup/profiles/$name.yaml"
  [ -n "$ret" ] && printf 'retention:\n%s\n' "$ret" >> "/etc/e2ebackup/profiles/$name.yaml"
  chmod 0600 "/etc/e2ebackup/profiles/$name.yaml"
}

_restart_sshd() {
  kill "$(cat "$SSHD_DIR/sshd.pid")" 2>/dev/null
  local i; for i in $(seq 1 50); do [ -e "$SSHD_DIR/sshd.pid" ] || break; pgrep -f "sshd -f $SSHD_DIR" >/dev/null || break; sleep 0.1; done
  /usr/sbin/sshd -f "$SSHD_DIR/sshd_config" -E "$E2E_OUT/sshd.log"
  for i in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null && return 0; sleep 0.1; done
  return 1
}

server_rotate_hostkey() {
  [ -e "$SSHD_DIR/ssh_host_ed25519_key.orig" ] || {
    mv "$SSHD_DIR/ssh_host_ed25519_key" "$SSHD_DIR/ssh_host_ed25519_key.orig"
    mv "$SSHD_DIR/ssh_host_ed25519_key.pub" "$SSHD_DIR/ssh_host_ed25519_key.pub.orig"
  }
  rm -f "$SSHD_DIR/ssh_host_ed25519_key" "$SSHD_DIR/ssh_host_ed25519_key.pub"
  ssh-keygen -q -t ed25519 -N '' -C e2e-impostor -f "$SSHD_DIR/ssh_host_ed25519_key"
  _restart_sshd
}

server_restore_hostkey() {
  [ -e "$SSHD_DIR/ssh_host_ed25519_key.orig" ] || return 0
  mv -f "$SSHD_DIR/ssh_host_ed25519_key.orig" "$SSHD_DIR/ssh_host_ed25519_key"
  mv -f "$SSHD_DIR/ssh_host_ed25519_key.pub.orig" "$SSHD_DIR/ssh_host_ed25519_key.pub"
  _restart_sshd
}
