#!/bin/bash
# timeout: 900
# Issue 7 (operating it): hooks fire in order with the documented environment, a before hook
# exiting 75 skips the run, healthcheck pings reach a local HTTP server on the right paths
# (start, success, fail with the log tail), the Prometheus textfile and the JSON outputs parse,
# `status` warns (exit 3) when the last success is older than the expected interval, and a
# terminal gets a live progress line during rsync.
source "$(dirname "$0")/../lib/common.sh"

P=hk
SRC=/srv/hk-data
HOOKLOG=/root/hk-hooks.log
HTTPLOG=/root/hk-http.log
PROM=/var/lib/node-exporter/e2ebackup-$P.prom
PORT=8099
E2E() { "$E2E_BIN" "$@"; }

# A healthchecks stand-in: answers 200 and logs "METHOD PATH BYTES FIRST-LINE-OF-BODY".
http_server() {
  python3 - "$PORT" "$HTTPLOG" <<'PY' &
import http.server, sys
port, log = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def handle_one(self, method):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n).decode(errors="replace")
        with open(log, "a") as f:
            f.write("%s %s %d %s\n" % (method, self.path, n, body.replace("\n", " | ")))
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"OK")
    def do_GET(self): self.handle_one("GET")
    def do_POST(self): self.handle_one("POST")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
PY
  echo $! > /root/hk-http.pid
  local i; for i in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0; sleep 0.2; done
  return 1
}

setup() {
  mkdir -p "$SRC/docs" "$(dirname "$PROM")"
  for i in 1 2 3; do head -c 200000 /dev/urandom > "$SRC/docs/f$i"; done
  scenario_profile $P 256M "$SRC"
  local log='echo "$E2EBACKUP_HOOK|$E2EBACKUP_PROFILE|${E2EBACKUP_SNAPSHOT-}|${E2EBACKUP_EXIT_CODE-}|${E2EBACKUP_RESULT-}|${E2EBACKUP_ERROR-}" >> '$HOOKLOG
  cat >> /etc/e2ebackup/profiles/$P.yaml <<EOF
hooks:
  before:
    - 'test -e /run/hk-away && exit 75; true'
    - '$log'
  after: '$log'
  failed: '$log'
  finally: '$log'
  timeout: 30s
monitoring:
  healthcheck_url: http://127.0.0.1:$PORT/ping/0f1e-uuid
  expected_interval: 1h
  prometheus_textfile: $PROM
EOF
  http_server
}

latest_id() { E2E snapshots $P --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])'; }
count_snaps() { E2E snapshots $P --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))'; }

check_success_run() {
  local id; id=$(latest_id) || return 1
  # before (no context), after and finally with the committed snapshot, exit 0, "success".
  diff <(cat "$HOOKLOG") <(printf '%s\n' "before|$P||||" "after|$P|$id|0|success|" "finally|$P|$id|0|success|") || return 1
  grep -q "^GET /ping/0f1e-uuid/start 0" "$HTTPLOG" || return 1
  grep -q "^POST /ping/0f1e-uuid [1-9][0-9]* .*snapshot $id committed" "$HTTPLOG" || return 1
  [ "$(wc -l < "$HTTPLOG")" = 2 ]
}

check_prom() {
  cat "$PROM"
  grep -q "^e2ebackup_last_exit_code{profile=\"$P\"} 0$" "$PROM" &&
  grep -q "^e2ebackup_snapshots{profile=\"$P\"} 1$" "$PROM" &&
  grep -q "^e2ebackup_container_size_bytes{profile=\"$P\"} 268435456$" "$PROM" &&
  awk -v p="e2ebackup_last_bytes_transferred{profile=\"$P\"}" '$1==p && $2==600000 {ok=1} END {exit !ok}' "$PROM" &&
  grep -q "^e2ebackup_last_success_timestamp_seconds{profile=\"$P\"} [0-9]" "$PROM"
}

check_json() {
  E2E status $P --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
r = s["last_run"]
assert r["result"] == "success" and r["snapshot"] and r["duration_seconds"] > 0, r
assert r["snapshot_count"] == 1 and "container_allocated" not in r, r
assert s["stale"] is None and not s["luks_open"] and not s["sshfs_mounted"], s
' && E2E snapshots $P --json | python3 -c 'import json,sys; json.load(sys.stdin)' &&
  E2E prune $P --dry-run --json | python3 -c 'import json,sys; json.load(sys.stdin)' &&
  E2E verify $P --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
assert v["ok"] and v["problems"] == [] and v["details"]["files_verified"] == 3, v' &&
  E2E keys verify $P --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
assert v["command"] == "keys verify" and v["exit_code"] == 0, v' &&
  E2E validate $P --connect --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
assert v["ok"] and v["details"]["container_exists"] and v["details"]["fsync_supported"], v'
}

skip_run() {
  : > "$HOOKLOG"; : > "$HTTPLOG"; touch /run/hk-away
  E2E run $P; local rc=$?
  rm -f /run/hk-away
  [ $rc = 0 ] || { echo "skipped run exited $rc"; return 1; }
  [ "$(count_snaps)" = 1 ] || { echo "a snapshot was taken"; return 1; }
  # Only `finally` ran after the skipping command; no ping.
  diff <(cat "$HOOKLOG") <(printf '%s\n' "finally|$P||0|skipped: target unavailable|") || return 1
  [ ! -s "$HTTPLOG" ] || { cat "$HTTPLOG"; return 1; }
  E2E status $P --json | python3 -c '
import json, sys
r = json.load(sys.stdin)["last_run"]
assert r["result"] == "skipped: target unavailable" and r["last_success"], r'
}

failed_run() {
  : > "$HOOKLOG"; : > "$HTTPLOG"
  mv "$SRC" "$SRC.away"
  E2E run $P; local rc=$?
  mv "$SRC.away" "$SRC"
  [ $rc = 1 ] || { echo "failed run exited $rc"; return 1; }
  cat "$HOOKLOG"
  [ "$(sed -n 1p "$HOOKLOG" | cut -d'|' -f1-5)" = "before|$P|||" ] &&
  [ "$(sed -n 2p "$HOOKLOG" | cut -d'|' -f1-5)" = "failed|$P||1|failed" ] &&
  [ "$(sed -n 3p "$HOOKLOG" | cut -d'|' -f1-5)" = "finally|$P||1|failed" ] &&
  sed -n 2p "$HOOKLOG" | grep -q "backup source $SRC does not exist" &&
  [ "$(wc -l < "$HOOKLOG")" = 3 ] || return 1
  grep -q "^GET /ping/0f1e-uuid/start" "$HTTPLOG" &&
  grep -q "^POST /ping/0f1e-uuid/fail .*ERROR: .*backup source $SRC does not exist" "$HTTPLOG" &&
  grep -q "^e2ebackup_last_exit_code{profile=\"$P\"} 1$" "$PROM"
}

stale_status() {
  sed -i 's/expected_interval: 1h/expected_interval: 1s/' /etc/e2ebackup/profiles/$P.yaml
  sleep 2
  E2E status $P > /root/hk-status.txt 2>&1; local rc=$?
  sed -i 's/expected_interval: 1s/expected_interval: 1h/' /etc/e2ebackup/profiles/$P.yaml
  cat /root/hk-status.txt
  [ $rc = 3 ] && grep -q "older than the expected interval 1s" /root/hk-status.txt
}

# A terminal (a pty from script(1)) gets the live progress line: rsync's progress2 figures.
progress_on_tty() {
  head -c 3000000 /dev/urandom > "$SRC/docs/big"
  script -qec "$E2E_BIN run $P" /root/hk-tty.txt > /dev/null; local rc=$?
  [ $rc = 0 ] || { echo "run on a tty exited $rc"; return 1; }
  grep -a -q "files copied" /root/hk-tty.txt && grep -a -q "ETA" /root/hk-tty.txt
}

check setup setup
check init E2E init $P
check run E2E run $P
check hooks-in-order-and-pings check_success_run
check prometheus-textfile check_prom
check json-outputs-parse check_json
check before-75-skips skip_run
check failed-run-hooks-and-fail-ping failed_run
check status-warns-when-stale stale_status
check progress-on-a-terminal progress_on_tty
kill "$(cat /root/hk-http.pid)" 2>/dev/null
check no-leftovers assert_no_leftovers
