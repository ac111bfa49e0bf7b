#!/bin/bash
# timeout: 600
# Issue 28, a newcomer's first month: docs/quick-start.md's commands, followed literally where
# the guest allows (the server is the guest's sshd, the package is the binary under test):
# the profile from profiles/example.yaml with only the parts quick-start names changed,
# validate, init, run, snapshots, status, schedule (no systemd running: units written, exit 3),
# monitoring (textfile, skips in a row), the recovery kit and a restore drill from it.
# One init, a few small files.
source "$(dirname "$0")/../lib/common.sh"

P=nc
SRC=/srv/nc-data
PROF=/etc/e2ebackup/profiles/$P.yaml
OFFLINE=/root/nc-offline
PROM=/root/nc-prom/$P.prom
E2E() { "$E2E_BIN" "$@"; }
# rc WANT CMD...: CMD exits WANT.
rc() { local want=$1; shift; "$@"; local got=$?; [ "$got" = "$want" ] || { echo "exit $got, want $want"; return 1; }; }

# Quick start 4: install the example, change the parts it names (host, user, keys, path, file,
# size, keyfile, recovery recipient, sources, excludes), and nothing else.
write_profile() {
  mkdir -p "$SRC/docs" "$OFFLINE" "$(dirname "$PROM")"
  for i in 1 2 3; do head -c 40000 /dev/urandom > "$SRC/docs/f$i"; done
  echo "thesis" > "$SRC/docs/thesis.txt"
  ssh-keygen -q -t ed25519 -N '' -C nc-offline -f "$OFFLINE/recovery"
  install -m 0600 "$E2E_REPO/profiles/example.yaml" "$PROF"
  sed -i -e "s#host: backup.example.org#host: 127.0.0.1#" \
    -e "s#identity_file: .*#identity_file: $DEMO_DIR/id_ed25519#" \
    -e "s#known_hosts: .*#known_hosts: $DEMO_DIR/known_hosts#" \
    -e "s#  path: .*#  path: $SERVER_DIR#" \
    -e "s#file: laptop.luks#file: $P.luks#" -e "s#size: 200G#size: 256M#" \
    -e "s#keyfile: /etc/e2ebackup/keys/laptop.key#keyfile: $DEMO_DIR/$P.key#" \
    -e "s#  \# recovery_recipients:#  recovery_recipients: [\"$(cut -d' ' -f1,2 "$OFFLINE/recovery.pub")\"]#" \
    -e "s#    - /home#    - $SRC#" -e "/^    - \/etc$/d" \
    -e "s#  \# prometheus_textfile: .*#  prometheus_textfile: $PROM#" "$PROF"
  cat "$PROF" | grep -v '^ *#' | grep -v '^$'
}

run_ok() {
  E2E run $P || return 1
  E2E snapshots $P
}

# Trap 1: the example's hooks ship commented out, so a copied profile runs (not skipped);
# status shows the run; the textfile has the figures.
status_after_run() {
  E2E status $P --json > /root/nc-status.json || return 1
  python3 -c '
import json
s = json.load(open("/root/nc-status.json"))
r = s["last_run"]
assert r["result"] == "success" and r["consecutive_skips"] == 0 and r["snapshot_count"] == 1, r
assert s["skipped_too_often"] is None and s["stale"] is None, s' &&
  grep -q "^e2ebackup_skip_alarm{profile=\"$P\"} 0$" "$PROM" &&
  grep -q "^e2ebackup_snapshots{profile=\"$P\"} 1$" "$PROM"
}

# Quick start 8, from the profile directory with a relative path, as a newcomer might.
schedule_units() {
  ( cd /etc/e2ebackup/profiles && rc 3 "$E2E_BIN" schedule ./$P.yaml --install --verify-read-data 10 ) || return 1
  grep -q "^ExecStart=.* run $PROF$" /etc/systemd/system/e2ebackup-$P.service &&
  grep -q "^ExecStart=.* verify $PROF --read-data 10$" /etc/systemd/system/e2ebackup-$P-verify.service &&
  ( cd /etc/e2ebackup/profiles && "$E2E_BIN" schedule ./$P.yaml ) | grep -q "nice -n 10 ionice -c 2 -n 7 .* -q run $PROF$"
}

# Trap 8: the kit, and a drill from it on "another machine": the client's keys and state are
# wiped, the kit's files are put back where its README says, keys are checked, files restored.
kit_drill() {
  E2E keys export-kit $P /root/nc-kit || return 1
  [ "$(stat -c %a /root/nc-kit)" = 700 ] || return 1
  ls -l /root/nc-kit; cat /root/nc-kit/README.txt
  rm -f "$DEMO_DIR/$P.key" "$DEMO_DIR/$P.key.header" "$DEMO_DIR/$P.key.escrow.age"
  rm -rf /var/lib/e2ebackup/$P
  install -m 0400 /root/nc-kit/$P.key "$DEMO_DIR/$P.key" &&
  install -m 0600 /root/nc-kit/$P.key.header "$DEMO_DIR/$P.key.header" &&
  install -m 0600 /root/nc-kit/$P.key.escrow.age "$DEMO_DIR/$P.key.escrow.age" || return 1
  # Without --identity the recovery key is not tested: said, and exit 3.
  E2E keys verify $P > /root/nc-kv.txt 2>&1; local r=$?
  cat /root/nc-kv.txt
  [ $r = 3 ] && grep -q "recovery key was NOT tested" /root/nc-kv.txt || return 1
  E2E keys verify $P --identity "$OFFLINE/recovery" || return 1
  E2E restore $P latest /srv/nc-restore --path "$SRC/docs" &&
  diff -r "$SRC/docs" "/srv/nc-restore$SRC/docs"
}

# Trap 1: skips are loud; max_skips in a row is an alarm (status exit 3, skip_alarm 1).
skips_alarm() {
  sed -i -e 's/^# hooks:/hooks:/' -e "s/^  max_skips: 3/  max_skips: 2/" "$PROF"
  sed -i "s/^  #   - 'timeout 5 bash .*/    - 'exit 75'/; s/^  # before:$/  before:/" "$PROF"
  grep -A2 '^hooks:' "$PROF"; grep -B1 "exit 75'" "$PROF"
  # (The drill wiped the state, so no success is recorded: status exits 3 for that as well;
  # the alarm itself is read from the JSON.)
  E2E run $P || return 1
  E2E status $P --json | python3 -c 'import json,sys; s=json.load(sys.stdin); assert s["skipped_too_often"] is None and s["last_run"]["consecutive_skips"] == 1, s' || return 1
  grep -q "^e2ebackup_skip_alarm{profile=\"$P\"} 0$" "$PROM" && E2E run $P || return 1
  E2E status $P > /root/nc-st.txt 2>&1; local r=$?
  cat /root/nc-st.txt
  [ $r = 3 ] && grep -q "the last 2 run(s) in a row" /root/nc-st.txt &&
    grep -q "the last 2 runs were skipped" /root/nc-st.txt &&
    grep -q "^e2ebackup_skip_alarm{profile=\"$P\"} 1$" "$PROM"
}

T0=$(_uptime)
check write-profile write_profile
check validate E2E validate $P
check validate-connect E2E validate $P --connect
check init E2E init $P
check run run_ok
check status-after-run status_after_run
check bad-calendar-refused rc 2 E2E schedule $P --on-calendar 'every day at 3'
check schedule-absolute-paths schedule_units
check verify-read-data E2E verify $P --read-data 10
check kit-drill kit_drill
check skips-alarm skips_alarm
check no-leftovers assert_no_leftovers
metric vm_seconds "$(awk -v a="$T0" -v b="$(_uptime)" 'BEGIN{printf "%.1f", b-a}')"
