#!/bin/bash
# timeout: 900
# Issue 14: a server whose storage hangs while sshd stays alive. The server's sftp-server
# (external, so that stopping it leaves sshd answering keepalives) is stopped with SIGSTOP
# mid-rsync. The I/O watchdog must end the run (exit 1, or 5 with the commands to finish)
# within server.timeout*3 + 60 s; the time from SIGSTOP to exit is printed as a metric.
# Then: nothing left mounted, the next run succeeds, older snapshots verify clean.
source "$(dirname "$0")/../lib/common.sh"

P=hang
SRC=/srv/hang-data
TIMEOUT=15
LIMIT=$((TIMEOUT * 3 + 60))
EXT=/run/e2e-sshd-ext
E2E() { "$E2E_BIN" "$@"; }

# A second sshd on port 2222, same host key and users, with the external sftp-server (the
# bed's sshd uses internal-sftp, which runs inside sshd's session process: stopping it would
# stop the keepalive answers too, which is the other, already covered, fault).
start_ext_sshd() {
  mkdir -p "$EXT"
  sed -e 's/^Port .*/Port 2222/' -e "s#^PidFile .*#PidFile $EXT/sshd.pid#" \
      -e 's#^Subsystem .*#Subsystem sftp /usr/lib/openssh/sftp-server#' \
      "$SSHD_DIR/sshd_config" > "$EXT/sshd_config"
  /usr/sbin/sshd -f "$EXT/sshd_config" -E "$E2E_OUT/sshd-ext.log" || return 1
  echo "[127.0.0.1]:2222 $(cut -d' ' -f1,2 "$SSHD_DIR/ssh_host_ed25519_key.pub")" > "$DEMO_DIR/known_hosts_2222"
  local i; for i in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/2222) 2>/dev/null && return 0; sleep 0.1; done
  return 1
}

make_profile() {
  scenario_profile $P 512M "$SRC"
  local f=/etc/e2ebackup/profiles/$P.yaml
  sed -i -e 's/^  port: .*/  port: 2222/' \
         -e "s#^  known_hosts: .*#  known_hosts: $DEMO_DIR/known_hosts_2222\n  timeout: $TIMEOUT#" "$f"
  grep -q "timeout: $TIMEOUT" "$f" && grep -q "port: 2222" "$f" || return 1
  mkdir -p "$SRC"; echo "first" > "$SRC/small"
}

# Start a run with 160 MiB to copy (~30 s or more through the stack under TCG), stop the
# server's sftp-server once rsync has been copying for a few seconds, time the run's exit.
hang_run() {
  head -c 160M /dev/urandom > "$SRC/big" || return 1
  "$E2E_BIN" run $P > "$E2E_OUT/hang-run.log" 2>&1 &
  local pid=$! i
  for i in $(seq 1 600); do pgrep -x rsync >/dev/null && break; sleep 0.2; done
  pgrep -x rsync >/dev/null || { echo "rsync never started"; cat "$E2E_OUT/hang-run.log"; return 1; }
  sleep 5
  local sftp; sftp=$(pgrep -u backupuser -x sftp-server)
  [ -n "$sftp" ] || { echo "no sftp-server process of backupuser"; return 1; }
  echo "stopping sftp-server: $sftp"
  kill -STOP $sftp
  local t0; t0=$(_uptime)
  wait $pid; local rc=$?
  local t1; t1=$(_uptime)
  local secs; secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')
  cat "$E2E_OUT/hang-run.log"
  metric hang_exit_code "$rc"
  metric seconds_from_sigstop_to_exit "$secs"
  echo "$rc" > "$E2E_OUT/hang-rc"
  # Let the server go again: continue and end the stopped sftp-server(s).
  kill -CONT $sftp; kill -TERM $sftp 2>/dev/null
  [ "$rc" = 1 ] || [ "$rc" = 5 ] || { echo "exit $rc, expected 1 or 5"; return 1; }
  awk -v s="$secs" -v l="$LIMIT" 'BEGIN{exit !(s <= l)}' || { echo "took $secs s > $LIMIT s"; return 1; }
  grep -q "stopped answering file requests" "$E2E_OUT/hang-run.log" || { echo "no watchdog message"; return 1; }
}

cleanup_if_needed() {
  if [ "$(cat "$E2E_OUT/hang-rc")" = 5 ]; then E2E cleanup $P; fi
}

check ext-sshd start_ext_sshd
check setup make_profile
check init E2E init $P
check first-run E2E run $P
check hang-ends-the-run hang_run
check cleanup-if-needed cleanup_if_needed
check no-leftovers-after-hang assert_no_leftovers
rm -f "$SRC/big"
check next-run-succeeds E2E run $P
check verify-clean E2E verify $P
check final-no-leftovers assert_no_leftovers
kill "$(cat "$EXT/sshd.pid")" 2>/dev/null
