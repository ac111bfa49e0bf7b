#!/bin/bash
# Build a tiny initramfs: busybox-static plus the modules needed to mount the host's root
# over virtio-9p and put a tmpfs-backed overlay on top of it.
#   KVER=... build-initramfs.sh OUT INIT_SCRIPT
set -euo pipefail
OUT=$1; INIT=$2
: "${KVER:?KVER must name the guest kernel}"
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{bin,proc,sys,dev,lower,rw,newroot,modules} "$(dirname "$OUT")"
BB=$(command -v busybox || true)
[ -n "$BB" ] && file -L "$BB" 2>/dev/null | grep -q 'statically linked' || BB=/bin/busybox
[ -x "$BB" ] || { echo "busybox-static is not installed" >&2; exit 1; }
cp "$BB" "$STAGE/bin/busybox"
for a in sh mount umount mkdir insmod switch_root cat echo sleep ls grep poweroff; do ln -s busybox "$STAGE/bin/$a"; done
# Module load order resolved by the host's kmod against the guest kernel's modules.dep.
for m in virtio_pci 9pnet_virtio 9p overlay; do
  modprobe -S "$KVER" --show-depends "$m" | awk '$1=="insmod"{print $2}'
done | awk '!seen[$0]++' > "$STAGE/order.full"
: > "$STAGE/modules/order"
while read -r ko; do
  case "$ko" in
    *.zst) zstd -q -d -c "$ko" > "$STAGE/modules/$(basename "${ko%.zst}")"; echo "$(basename "${ko%.zst}")" >> "$STAGE/modules/order" ;;
    *.xz) xz -d -c "$ko" > "$STAGE/modules/$(basename "${ko%.xz}")"; echo "$(basename "${ko%.xz}")" >> "$STAGE/modules/order" ;;
    *) cp "$ko" "$STAGE/modules/"; basename "$ko" >> "$STAGE/modules/order" ;;
  esac
done < "$STAGE/order.full"
rm "$STAGE/order.full"
cp "$INIT" "$STAGE/init"; chmod +x "$STAGE/init"
(cd "$STAGE" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "vm-tests: built $(basename "$OUT") ($(stat -c %s "$OUT") bytes), modules: $(tr '\n' ' ' < "$STAGE/modules/order")"
