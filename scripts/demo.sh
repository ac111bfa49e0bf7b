#!/bin/bash
# The demo: boot the test VM (a real Debian kernel under QEMU, with its own sshd as the
# "untrusted server"), then run e2ebackup there end to end: init, a backup, a change, a
# second backup, and show what the server and the client each see.
# Run as root on Debian. Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
scripts/install-deps.sh
cargo build --release --locked
E2E_BIN="$PWD/target/release/e2ebackup" exec vm-tests/run.sh vm-tests/demo/demo.sh
