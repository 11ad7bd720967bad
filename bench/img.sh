#!/usr/bin/env bash
# oxvirt img vs qemu-img on the same inputs, in one run; prints wall times
# and ratios (qemu-img time / oxvirt time: above 1 means oxvirt is faster),
# and the same for CPU time (user + system, all threads), which still
# means something when other work loads the machine.
#
#   bash bench/img.sh                  # 4 GiB image, 1 GiB of data
#   SIZE_MB=1024 DATA_MB=256 bash bench/img.sh   # quicker
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
SIZE_MB=${SIZE_MB:-4096}
DATA_MB=${DATA_MB:-1024}
CHECK_GB=${CHECK_GB:-16}
IOPS_OPS=${IOPS_OPS:-200000}
cargo build --release -p oxvirt-cli >/dev/null
cargo build --release -p diskimg --example iops >/dev/null
ox=${CARGO_TARGET_DIR:-target}/release/oxvirt
iops=${CARGO_TARGET_DIR:-target}/release/examples/iops
work=$(mktemp -d "${TMPDIR:-/var/tmp}/oxvirt-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT

secs() { # runs "$@", prints its wall time and CPU time in seconds
    local TIMEFORMAT='%R %U %S' t
    t=$({ time "$@" >/dev/null 2>&1; } 2>&1)
    awk '{ printf "%s %.3f", $1, $2 + $3 }' <<<"$t"
}

row() { # name, "oxvirt wall cpu", "qemu-img wall cpu"
    local ow oc qw qc
    read -r ow oc <<<"$2"
    read -r qw qc <<<"$3"
    printf '%-40s %8.2f s %8.2f s %6.2fx   cpu %7.2f s %7.2f s %6.2fx\n' "$1" "$ow" "$qw" \
        "$(awk -v a="$qw" -v b="$ow" 'BEGIN { print a / b }')" "$oc" "$qc" \
        "$(awk -v a="$qc" -v b="$oc" 'BEGIN { print a / b }')"
}

echo "== inputs: ${SIZE_MB} MiB raw image with ${DATA_MB} MiB of random data in scattered 4 MiB extents"
truncate -s "${SIZE_MB}M" "$work/src.raw"
extents=$((DATA_MB / 4))
stride=$((SIZE_MB / extents))
for ((i = 0; i < extents; i++)); do
    dd if=/dev/urandom of="$work/src.raw" bs=1M count=4 seek=$((i * stride)) conv=notrunc status=none
done
sync
printf '%-40s %10s %10s %7s   %-11s %9s %7s\n' "row" "oxvirt" "qemu-img" "ratio" "cpu oxvirt" "qemu-img" "ratio"

o=$(secs "$ox" img convert -O qcow2 "$work/src.raw" "$work/ox.qcow2")
q=$(secs qemu-img convert -O qcow2 "$work/src.raw" "$work/q.qcow2")
row "raw -> qcow2" "$o" "$q"

o=$(secs "$ox" img convert -O raw "$work/ox.qcow2" "$work/ox.raw")
q=$(secs qemu-img convert -O raw "$work/q.qcow2" "$work/q.raw")
row "qcow2 -> raw" "$o" "$q"
rm -f "$work/ox.raw" "$work/q.raw"

for c in zlib zstd; do
    o=$(secs "$ox" img convert -c -O qcow2 -o compression_type=$c "$work/src.raw" "$work/oc.qcow2")
    q=$(secs qemu-img convert -c -O qcow2 -o compression_type=$c "$work/src.raw" "$work/qc.qcow2")
    row "raw -> qcow2 -c ($c)" "$o" "$q"
    qemu-img compare -q "$work/oc.qcow2" "$work/src.raw"
    rm -f "$work/oc.qcow2" "$work/qc.qcow2"
done
rm -f "$work/q.qcow2" "$work/ox.qcow2"

echo "== check: ${CHECK_GB} GiB qcow2, every 64 KiB cluster allocated (preallocation=metadata)"
qemu-img create -q -f qcow2 -o preallocation=metadata "$work/big.qcow2" "${CHECK_GB}G"
o=$(secs "$ox" img check "$work/big.qcow2")
q=$(secs qemu-img check "$work/big.qcow2")
row "check (${CHECK_GB} GiB, all clusters)" "$o" "$q"
rm -f "$work/big.qcow2"

echo "== library: 4 KiB random I/O, ${IOPS_OPS} ops on 1 GiB, qcow2 (allocated) vs raw (ratio: qcow2/raw)"
dd if=/dev/zero of="$work/io.raw" bs=1M count=1024 status=none
"$ox" img convert -S 0 -O qcow2 "$work/io.raw" "$work/io.qcow2"
cat "$work/io.raw" "$work/io.qcow2" >/dev/null # both in the page cache
printf '%-40s %10s %10s %7s   %-11s %9s %7s\n' "row (ops/s)" "qcow2" "raw" "ratio" "per cpu-s" "raw" "ratio"
for mode in read write; do
    read -r rw rc <<<"$("$iops" "$work/io.raw" "$IOPS_OPS" $mode)"
    read -r qw qc <<<"$("$iops" "$work/io.qcow2" "$IOPS_OPS" $mode)"
    printf '%-40s %10s %10s %6.2fx   %11s %9s %6.2fx\n' "4k random $mode: qcow2 vs raw" "$qw" "$rw" \
        "$(awk -v a="$qw" -v b="$rw" 'BEGIN { print a / b }')" "$qc" "$rc" \
        "$(awk -v a="$qc" -v b="$rc" 'BEGIN { print a / b }')"
done
qemu-img check -q "$work/io.qcow2"
