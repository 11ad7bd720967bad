#!/usr/bin/env bash
# Fetches the Debian cloud kernel for oxvirt's Linux boot tests and benchmarks
# (never committed). Leaves under .peer/kernel/:
#   vmlinuz  the bzImage (Linux 64-bit boot protocol)
#   vmlinux  the uncompressed ELF inside it (PVH boot; the cloud config has CONFIG_PVH=y)
# Idempotent: returns at once when both files are there.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.peer/kernel
if [ -s "$dest/vmlinuz" ] && [ -s "$dest/vmlinux" ]; then
    exit 0
fi
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# linux-image-cloud-amd64 is a metapackage: its dependency names the kernel.
pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
[ -n "$pkg" ] || { echo "fetch-kernel: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
echo "fetch-kernel: downloading $pkg"
(cd "$work" && apt-get download -qq "$pkg")
dpkg-deb -x "$work"/*.deb "$work/root"
cp "$work"/root/boot/vmlinuz-* "$dest/vmlinuz.tmp"

# The bzImage carries the compressed kernel after its setup code; find the
# payload by its magic and decompress it into the ELF vmlinux.
extract() { # magic-as-printf-escape decompressor
    local offsets
    offsets=$(grep -abo -P "$1" "$dest/vmlinuz.tmp" | cut -d: -f1 || true)
    for off in $offsets; do
        tail -c +$((off + 1)) "$dest/vmlinuz.tmp" | $2 >"$work/vmlinux" 2>/dev/null || true
        if [ "$(head -c 4 "$work/vmlinux" 2>/dev/null | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
            return 0
        fi
    done
    return 1
}
extract '\x02\x21\x4c\x18' 'lz4 -dc' ||
    extract '\xfd\x37\x7a\x58\x5a\x00' 'xz -dc' ||
    extract '\x28\xb5\x2f\xfd' 'zstd -dc' ||
    extract '\x1f\x8b\x08' 'gzip -dc' ||
    { echo "fetch-kernel: no known compressed payload in $pkg's bzImage" >&2; exit 1; }
mv "$work/vmlinux" "$dest/vmlinux"
mv "$dest/vmlinuz.tmp" "$dest/vmlinuz"
echo "fetch-kernel: $dest/vmlinuz and $dest/vmlinux ($pkg)"
