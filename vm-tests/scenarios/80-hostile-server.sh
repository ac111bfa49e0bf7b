#!/bin/bash
# timeout: 600
# Issue 13: a hostile server plants links, a FIFO and a lock link where the tool's files
# belong. Each attack is performed as the server user (backupuser) in the server directory;
# the tool refuses it with exit 6 by its own no-follow check (fsutil::ServerDir), naming the
# server path, before it writes anything: the victim file keeps its sha256 and size, no
# container, keyfile or lock appears, and nothing is left mounted or open.
# No container is needed: every check runs right after the server directory is mounted.
source "$(dirname "$0")/../lib/common.sh"

P=hostile
SRC=/srv/hostile-data
VICTIM=/srv/victim.bin            # a root-owned client file the server user can name
KEY=$DEMO_DIR/$P.key
E2E() { "$E2E_BIN" "$@"; }
as_server() { su -s /bin/sh backupuser -c "cd $SERVER_DIR && $1"; }
setup() {
  scenario_profile $P 256M "$SRC"
  mkdir -p "$SRC"; echo data > "$SRC/f"
  head -c 65536 /dev/urandom > "$VICTIM"; chmod 0644 "$VICTIM"
  sha256sum "$VICTIM" > /root/victim.sha256
}
victim_intact() {
  sha256sum -c --quiet /root/victim.sha256 && [ "$(stat -c %s "$VICTIM")" = 65536 ]
}
clean_server() { as_server "rm -f $P.luks $P.luks.init-partial $P.luks.escrow.age $P.luks.lock"; }
# attack NAME PLANT CMD...: plant as the server user, run CMD, require exit 6 naming the
# planted server path, the victim intact, nothing else created, nothing left.
attack() {
  local name=$1 plant=$2; shift 2
  local out rc before after
  clean_server
  as_server "$plant" || { echo "could not plant: $plant"; return 1; }
  before=$(ls -lA --time-style=+%s "$SERVER_DIR")
  out=$(timeout 120 "$E2E_BIN" "$@" 2>&1); rc=$?
  after=$(ls -lA --time-style=+%s "$SERVER_DIR")
  echo "$out" | tail -5
  metric "$name.exit" "$rc"
  [ "$rc" = 6 ] || { echo "expected exit 6, got $rc"; return 1; }
  echo "$out" | grep -q "127.0.0.1:$SERVER_DIR/$name" || { echo "message does not name $name"; return 1; }
  victim_intact || { echo "VICTIM CHANGED"; return 1; }
  [ "$before" = "$after" ] || { echo "server directory changed:"; diff <(echo "$before") <(echo "$after"); return 1; }
  assert_no_leftovers
}

check setup setup
check no-keyfile-yet test ! -e "$KEY"
# init: a planted .init-partial (absolute link), escrow link, lock link and lock FIFO.
check init-partial-abs-link attack $P.luks.init-partial "ln -s $VICTIM $P.luks.init-partial" init $P
check init-keyfile-not-created test ! -e "$KEY"
check init-escrow-link attack $P.luks.escrow.age "ln -s ../victim.bin $P.luks.escrow.age" init $P
check init-lock-link attack $P.luks.lock "ln -s $VICTIM $P.luks.lock" init $P
check init-lock-fifo attack $P.luks.lock "mkfifo $P.luks.lock" init $P
# run and the read side: the container itself as a link (absolute, `..`, and one that stays
# inside the directory), with a keyfile in place so the commands get as far as they can.
check keyfile bash -c "head -c 4096 /dev/urandom > $KEY && chmod 0400 $KEY"
check run-container-abs-link attack $P.luks "ln -s $VICTIM $P.luks" run $P
check run-container-dotdot-link attack $P.luks "ln -s ../victim.bin $P.luks" run $P
check snapshots-container-inside-link attack $P.luks "head -c 1M /dev/zero > inside.img && ln -s inside.img $P.luks" snapshots $P
as_server "rm -f inside.img"
check grow-container-link attack $P.luks "ln -s $VICTIM $P.luks" grow $P --size +64M
check keys-verify-escrow-link attack $P.luks.escrow.age "head -c 1M /dev/zero > $P.luks && ln -s $VICTIM $P.luks.escrow.age" keys verify $P
check clean clean_server
check victim-intact victim_intact
check no-leftovers assert_no_leftovers
