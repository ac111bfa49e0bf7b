#!/bin/bash
# Build the Debian package: target/debian/e2ebackup_<version>-1_<arch>.deb (path printed last).
#
#   scripts/build-deb.sh [--no-build]    --no-build: reuse target/release/e2ebackup as it is
#
# Installs cargo-deb if it is missing (`cargo install --locked`: a few minutes on a fresh
# machine), builds the release binary, writes the man pages and shell completions with the
# binary's hidden `generate-assets` command (generated from the clap definition, so they match
# `--help` exactly) into target/assets, and packages with `cargo deb --no-build`.
# Assets: [package.metadata.deb] in Cargo.toml; maintainer scripts, changelog (its top entry
# must match the crate version) and lintian overrides: debian/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
BUILD=1
case "${1:-}" in
  --no-build) BUILD=0 ;;
  "") ;;
  -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
  *) echo "build-deb: unknown argument $1" >&2; exit 2 ;;
esac
if ! cargo deb --version >/dev/null 2>&1; then
  echo "build-deb: installing cargo-deb"
  T0=$(date +%s)
  cargo install cargo-deb --locked --quiet
  echo "build-deb: cargo-deb installed in $(( $(date +%s) - T0 )) s"
fi
VER=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
head -1 debian/changelog | grep -qF "e2ebackup ($VER-" ||
  { echo "build-deb: debian/changelog has no entry for version $VER at the top: add one" >&2; exit 1; }
[ $BUILD -eq 1 ] && cargo build --release --locked
BIN=target/release/e2ebackup   # cargo-deb and the asset paths assume ./target
[ -x "$BIN" ] || { echo "build-deb: $BIN is missing (build without --no-build)" >&2; exit 1; }
# cargo-deb reads assets from target/ in the source tree.
rm -rf target/assets
"$BIN" generate-assets target/assets
rm -f target/debian/e2ebackup_*.deb
# --strip: [profile.release] keeps line tables for backtraces; the package does not need them.
cargo deb --no-build --strip --quiet
DEB=$(ls target/debian/e2ebackup_*.deb)
# lintian is not a build dependency; where it is installed, errors fail the build.
if command -v lintian >/dev/null; then
  rc=0; out=$(lintian --fail-on error "$DEB" 2>&1) || rc=$?
  grep -v 'running with root privileges' <<<"$out" || true
  [ $rc -eq 0 ] || { echo "build-deb: lintian found errors in $DEB" >&2; exit 1; }
fi
echo "build-deb: $(du -h "$DEB" | cut -f1) $DEB"
