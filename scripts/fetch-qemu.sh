#!/usr/bin/env bash
# Unpacks Debian's QEMU (qemu-system-x86 7.2) privately under .peer/qemu, the
# peer VMM the probe-guest and VMM tests and benchmarks compare against.
#
# `apt-get install qemu-system-x86` is not an option: it would replace the
# machine's qemu-utils 10 (qemu-img) with 7.2, which the image tests need.
# So: apt-get download the packages, dpkg-deb -x them here, and apt-get
# install only the shared libraries qemu-system-x86 depends on.
# Idempotent: when the unpacked binary already runs, this does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

dest=.peer/qemu
bin=$dest/usr/bin/qemu-system-x86_64
# The binary, its common files, and its firmware (qboot as bios-microvm.bin,
# pvh.bin, linuxboot_dma.bin under usr/share/qemu, QEMU's -L folder).
packages=(qemu-system-x86 qemu-system-common qemu-system-data)

if "$bin" --version >/dev/null 2>&1; then
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "fetch-qemu: downloading ${packages[*]}"
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "${packages[@]}") ||
    { apt-get update -qq && (cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "${packages[@]}"); }

# Shared-library dependencies of the binary: qemu-system-x86's Depends, first
# alternative of each, without versions, without the packages unpacked here
# (qemu-*) and the firmware packages microvm does not use (seabios, ipxe-qemu).
# qemu-system-common's own Depends (spice, audio, usb, gbm) serve its helper
# programs and loadable UI/audio modules, which -display none never loads.
mapfile -t libs < <(dpkg-deb -f "$work"/qemu-system-x86_*.deb Depends |
    tr ',' '\n' | sed -E 's/\|.*//; s/\(.*\)//; s/:any//; s/^ +| +$//g' |
    grep -v -E '^(qemu-|seabios$|ipxe-qemu$)' | grep -v '^$')
missing=()
for pkg in "${libs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "fetch-qemu: installing libraries ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

rm -rf "$dest"
mkdir -p "$dest"
for deb in "$work"/*.deb; do
    dpkg-deb -x "$deb" "$dest"
done
"$bin" --version | head -n 1
