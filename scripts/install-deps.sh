#!/bin/bash
# Install what building and testing e2ebackup needs on Debian (run as root).
# Idempotent: packages already present are left alone; apt runs only when something is missing.
#   scripts/install-deps.sh [EXTRA-PACKAGE ...]   (scripts/bench.sh adds the peers it compares)
set -euo pipefail
PKGS=(
  # build: libcryptsetup-rs needs bindgen (libclang) and libcryptsetup; ssh2 needs OpenSSL
  build-essential pkg-config libclang-dev libcryptsetup-dev libssl-dev
  # run time: the tools the stack drives
  cryptsetup-bin sshfs fuse3 openssh-client rsync e2fsprogs util-linux acl attr nbd-client
  # tests: a local sshd, and the VM bed (Debian kernel under QEMU, busybox initramfs)
  openssh-server qemu-system-x86 linux-image-amd64 busybox-static cpio kmod nbdkit
  procps psmisc iproute2
  # packaging: cargo-deb's $auto (dpkg-shlibdeps), and the VM's package check renders the
  # man pages (man-db) and verifies the installed units (systemd-analyze)
  dpkg-dev man-db systemd
)
PKGS+=("$@")
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "install-deps: cargo is in $HOME/.cargo/bin; add it to PATH" >&2
  else
    echo "install-deps: no Rust toolchain found: install one (rustup, or apt-get install cargo)" >&2
  fi
  exit 1
fi
echo "install-deps: all dependencies present"
