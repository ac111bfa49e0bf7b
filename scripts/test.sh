#!/bin/bash
# Run every test: unit tests, host-level privileged tests (sshd on 127.0.0.1, sshfs, loop,
# ext4), and the VM tier (real dm-crypt, sshfs, NBD under a Debian kernel in QEMU).
# Run as root on Debian. Installs what it needs. Exit status 0 only if everything passed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
scripts/install-deps.sh
T0=$(date +%s)
echo "== build"
cargo build --release --locked
echo "== unit and host tests (privileged tests are #[ignore]d unless run as root like this, one at a time)"
cargo test --release --locked -- --test-threads=1 --include-ignored
echo "== Debian package (vm-tests/scenarios/70-package.sh installs it)"
scripts/build-deb.sh --no-build
T1=$(date +%s)
echo "== vm-tests"
E2E_BIN="$PWD/target/release/e2ebackup" vm-tests/run.sh --timeout 3600 "$@"
echo "== vm-tests self-test (a failing and a hanging scenario must be reported as failures)"
E2E_BIN="$PWD/target/release/e2ebackup" vm-tests/selftest.sh
T2=$(date +%s)
echo "timing: build+cargo test+package $((T1-T0)) s, vm-tests $((T2-T1)) s, total $((T2-T0)) s"
