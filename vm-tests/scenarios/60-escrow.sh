#!/bin/bash
# timeout: 900
# Issue 6 (key-loss resilience), the disaster drill: the client loses its keyfile, header
# copy and state; with only the offline recovery identity and server access, recover-key
# brings the keyfile back and a restore gives byte-identical files. The client is lost in the
# middle of a `keys rotate --reencrypt`: the rebuilt client finishes it from the server's
# header before the restore.
source "$(dirname "$0")/../lib/common.sh"

P=esc
SRC=/srv/esc-data
OFFLINE=/root/offline
E2E() { "$E2E_BIN" "$@"; }
setup() {
  mkdir -p "$OFFLINE" "$SRC/docs"
  ssh-keygen -q -t ed25519 -N '' -C offline-recovery -f "$OFFLINE/id_ed25519"
  scenario_profile $P 64M "$SRC"
  sed -i "s#^  keyfile: .*#&\n  recovery_recipients: [\"$(cat "$OFFLINE/id_ed25519.pub")\"]#" /etc/e2ebackup/profiles/$P.yaml
  for i in 1 2 3; do head -c 50000 /dev/urandom > "$SRC/docs/f$i"; done
  echo "the only copy" > "$SRC/docs/important.txt"
}
wipe_client() {
  cp "$DEMO_DIR/esc.key" /root/esc.key.before
  rm -f "$DEMO_DIR/esc.key" "$DEMO_DIR/esc.key.header" "$DEMO_DIR/esc.key.escrow.age"
  rm -rf /var/lib/e2ebackup/esc
}

check setup setup
check validate E2E validate $P
check init E2E init $P
check escrow-on-server test -s "$SERVER_DIR/esc.luks.escrow.age"
check escrow-is-age bash -c "head -c 21 $SERVER_DIR/esc.luks.escrow.age | grep -q 'age-encryption.org/v1'"
check run E2E run $P
check keys-verify E2E keys verify $P --identity "$OFFLINE/id_ed25519"
check keys-verify-wrong-identity bash -c "ssh-keygen -q -t ed25519 -N '' -f /root/wrong && ! $E2E_BIN keys verify $P --identity /root/wrong"
# The client is lost in the middle of a `keys rotate --reencrypt` (stopped by SIGTERM at 10%
# or more): the server's header and the escrow must still be enough.
reencrypt_stopped() {
  local log=/root/esc-reencrypt.log rc
  bg_until 're-encrypted .* of ' "$log" "$E2E_BIN" keys rotate $P --reencrypt
  kill -TERM $BG_PID; wait $BG_PID; rc=$?; tail -4 "$log"
  [ $rc = 130 ] || { echo "exit $rc, not 130"; return 1; }
  grep -q "keys rotate $P --reencrypt\` goes on from there" "$log"
}
check reencrypt-stopped reencrypt_stopped
check wipe-client wipe_client
check run-without-key-fails bash -c "! $E2E_BIN run $P"
check recover-key E2E recover-key $P --identity "$OFFLINE/id_ed25519"
check key-identical cmp "$DEMO_DIR/esc.key" /root/esc.key.before
check key-mode-0400 test "$(stat -c %a "$DEMO_DIR/esc.key")" = 400
check recover-refuses-overwrite bash -c "$E2E_BIN recover-key $P --identity $OFFLINE/id_ed25519; [ \$? = 2 ]"
finish_reencrypt() { # the rebuilt client (recover-key pinned the server's header) goes on
  local out rc; out=$("$E2E_BIN" keys rotate $P --reencrypt 2>&1); rc=$?; echo "$out" | tail -12
  [ $rc = 0 ] && echo "$out" | grep -q 'going on from .* where the last attempt stopped'
}
check reencrypt-finished-by-rebuilt-client finish_reencrypt
check restore-after-drill E2E restore $P latest /srv/esc-restore
check restored-identical bash -c "[ -z \"\$(rsync -aHAXc --numeric-ids --dry-run --itemize-changes --delete $SRC/ /srv/esc-restore$SRC/)\" ]"
check no-key-bytes-in-logs bash -c "! grep -rqa -F \"\$(head -c 24 /root/esc.key.before | base64)\" $E2E_OUT/*.log"
check no-leftovers assert_no_leftovers
