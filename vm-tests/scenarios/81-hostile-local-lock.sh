#!/bin/bash
# timeout: 300
# Issue 13: an unprivileged local user attacks the local lock. The lock used to live in the
# world-writable /run/lock/e2ebackup, where a user could plant NAME.lock as a link to a
# root-owned file (root then truncated it to "pid N") or hold it to block every backup. Now
# it lives in /run/e2ebackup/lock (root, 0700, verified by owner and mode): the planted link
# is never touched, and a lock directory with the wrong owner or mode is exit 6, named.
source "$(dirname "$0")/../lib/common.sh"

P=lockatk
SRC=/srv/lockatk-data
VICTIM=/srv/lock-victim            # root-owned, 4096 bytes
E2E() { "$E2E_BIN" "$@"; }
setup() {
  scenario_profile $P 256M "$SRC"
  mkdir -p "$SRC"
  id attacker >/dev/null 2>&1 || useradd -M -s /bin/sh attacker
  chmod 1777 /run/lock   # as on Debian (the guest's init makes it 0755)
  head -c 4096 /dev/urandom > "$VICTIM"; chmod 0644 "$VICTIM"
  sha256sum "$VICTIM" > /root/lock-victim.sha256
}
victim_intact() {
  sha256sum -c --quiet /root/lock-victim.sha256 && [ "$(stat -c %s "$VICTIM")" = 4096 ]
}
as_attacker() { su -s /bin/sh attacker -c "$1"; }
plant_old_lock() {
  # What the attack needed before: the shared directory, and the lock name as a link.
  as_attacker "mkdir -p /run/lock/e2ebackup && ln -sf $VICTIM /run/lock/e2ebackup/$P.lock"
}
attacker_cannot_enter() {
  as_attacker "ls /run/e2ebackup/lock" && return 1
  as_attacker "ln -s $VICTIM /run/e2ebackup/lock/$P.lock" && return 1
  return 0
}
# `cleanup` takes the local lock (and does nothing else here); `status` takes none.
status_ok() { E2E status $P && E2E cleanup $P; }
wrong_mode_refused() {
  local out rc
  chmod 0755 /run/e2ebackup/lock
  out=$("$E2E_BIN" cleanup $P 2>&1); rc=$?
  chmod 0700 /run/e2ebackup/lock
  echo "$out" | tail -3; metric wrong-mode.exit $rc
  [ $rc = 6 ] && echo "$out" | grep -q "/run/e2ebackup/lock"
}
wrong_owner_refused() {
  local out rc
  chown attacker /run/e2ebackup/lock
  out=$("$E2E_BIN" cleanup $P 2>&1); rc=$?
  chown root /run/e2ebackup/lock
  echo "$out" | tail -3; metric wrong-owner.exit $rc
  [ $rc = 6 ] && echo "$out" | grep -q "owned by uid"
}

check setup setup
check plant-old-lock plant_old_lock
check status-and-cleanup-run status_ok
check victim-intact-after-status victim_intact
check lock-dir-private bash -c '[ "$(stat -c %a:%u /run/e2ebackup/lock)" = 700:0 ]'
check attacker-cannot-enter attacker_cannot_enter
check wrong-mode-exit-6 wrong_mode_refused
check wrong-owner-exit-6 wrong_owner_refused
check victim-intact victim_intact
check no-leftovers assert_no_leftovers
