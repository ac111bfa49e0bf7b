#!/bin/bash
# timeout: 900
# Issue 6 (key-loss resilience), the disaster drill: the client loses its keyfile, header
# copy and state; with only the offline recovery identity and server access, recover-key
# brings the keyfile back and a restore gives byte-identical files.
source "$(dirname "$0")/../lib/common.sh"

P=esc
SRC=/srv/esc-data
OFFLINE=/root/offline
E2E() { "$E2E_BIN" "$@"; }
setup() {
  mkdir -p "$OFFLINE" "$SRC/docs"
  ssh-keygen -q -t ed25519 -N '' -C offline-recovery -f "$OFFLINE/id_ed25519"
  scenario_profile $P 256M "$SRC"
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
check wipe-client wipe_client
check run-without-key-fails bash -c "! $E2E_BIN run $P"
check recover-key E2E recover-key $P --identity "$OFFLINE/id_ed25519"
check key-identical cmp "$DEMO_DIR/esc.key" /root/esc.key.before
check key-mode-0400 test "$(stat -c %a "$DEMO_DIR/esc.key")" = 400
check recover-refuses-overwrite bash -c "$E2E_BIN recover-key $P --identity $OFFLINE/id_ed25519; [ \$? = 2 ]"
check restore-after-drill E2E restore $P latest /srv/esc-restore
check restored-identical bash -c "[ -z \"\$(rsync -aHAXc --numeric-ids --dry-run --itemize-changes --delete $SRC/ /srv/esc-restore$SRC/)\" ]"
check no-key-bytes-in-logs bash -c "! grep -rqa -F \"\$(head -c 24 /root/esc.key.before | base64)\" $E2E_OUT/*.log"
check no-leftovers assert_no_leftovers
