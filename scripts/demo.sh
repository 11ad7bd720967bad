#!/usr/bin/env bash
# The README's main job: build oxvirt and show it working on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace
ox=target/release/oxvirt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== oxvirt img: a qcow2 round trip"
$ox img create -f qcow2 "$work/disk.qcow2" 64M
$ox img info "$work/disk.qcow2"
$ox img convert -f qcow2 -O raw "$work/disk.qcow2" "$work/disk.raw"
$ox img compare "$work/disk.qcow2" "$work/disk.raw"
$ox img check "$work/disk.qcow2"
echo "== oxvirt img: compressed copy, overlay, snapshot; qemu-img checks each"
head -c 8M /dev/urandom | base64 > "$work/data.raw"
$ox img convert -p -c -O qcow2 -o compression_type=zstd "$work/data.raw" "$work/packed.qcow2"
$ox img create -f qcow2 -b packed.qcow2 -F qcow2 "$work/overlay.qcow2"
$ox img snapshot -c first "$work/overlay.qcow2"
$ox img info --backing-chain "$work/overlay.qcow2"
qemu-img check "$work/packed.qcow2"
qemu-img check "$work/overlay.qcow2"
qemu-img compare "$work/overlay.qcow2" "$work/data.raw"
