#!/usr/bin/env bash
# oxvirt img vs qemu-img on the same inputs, in one run; prints wall times
# and ratios (qemu-img time / oxvirt time: above 1 means oxvirt is faster),
# and the same for CPU time (user + system, all threads), which still
# means something when other work loads the machine. Each side runs
# ROUNDS times (3; oxvirt and qemu-img take turns at going first) and its
# best time counts.
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
WARM_GB=${WARM_GB:-3}
ROUNDS=${ROUNDS:-3}
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

# On a VM whose host takes back free memory (virtio-balloon free page
# reporting, as on this project's machines), the first write to a page the
# host took back costs ~1.5 s per GiB. A convert writes ~1 GiB of fresh page
# cache, so whichever run found the most reclaimed pages was up to 3x slower
# whatever its code did. Touching 3 GiB just before each timed run gives
# every run memory the host backs.
back_memory() {
    python3 -c "b = b'\x01' * ($WARM_GB << 30)"
}

timed() { # fresh (1: remove the command's last argument, its output, first), command...
    local fresh=$1
    shift
    if [[ $fresh == 1 ]]; then rm -f "${@: -1}"; fi
    sync # the last run's dirty pages are not written back during this one
    back_memory
    secs "$@"
}

best() { # "wall cpu" lines -> the lowest wall time and the lowest CPU time
    awk 'NR == 1 || $1 < w { w = $1 } NR == 1 || $2 < c { c = $2 } END { print w, c }' <<<"$1"
}

ab() { # name, fresh, oxvirt command (array name), qemu-img command (array name)
    # ROUNDS rounds, oxvirt first in the even ones and qemu-img first in
    # the odd ones (whichever runs first after a change of files tends to
    # be slower on a loaded machine); each side's best.
    local -n ox_cmd=$3 q_cmd=$4
    local o="" q="" r
    for ((r = 0; r < ROUNDS; r++)); do
        if ((r % 2 == 0)); then
            o+=$(timed "$2" "${ox_cmd[@]}")$'\n'
            q+=$(timed "$2" "${q_cmd[@]}")$'\n'
        else
            q+=$(timed "$2" "${q_cmd[@]}")$'\n'
            o+=$(timed "$2" "${ox_cmd[@]}")$'\n'
        fi
    done
    row "$1" "$(best "${o%$'\n'}")" "$(best "${q%$'\n'}")"
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

oc=("$ox" img convert -O qcow2 "$work/src.raw" "$work/ox.qcow2")
qc=(qemu-img convert -O qcow2 "$work/src.raw" "$work/q.qcow2")
ab "raw -> qcow2" 1 oc qc

oc=("$ox" img convert -O raw "$work/ox.qcow2" "$work/ox.raw")
qc=(qemu-img convert -O raw "$work/q.qcow2" "$work/q.raw")
ab "qcow2 -> raw" 1 oc qc
rm -f "$work/ox.raw" "$work/q.raw"

for c in zlib zstd; do
    oc=("$ox" img convert -c -O qcow2 -o compression_type=$c "$work/src.raw" "$work/oc.qcow2")
    qc=(qemu-img convert -c -O qcow2 -o compression_type=$c "$work/src.raw" "$work/qc.qcow2")
    ab "raw -> qcow2 -c ($c)" 1 oc qc
    qemu-img compare -q "$work/oc.qcow2" "$work/src.raw"
    rm -f "$work/oc.qcow2" "$work/qc.qcow2"
done
rm -f "$work/q.qcow2" "$work/ox.qcow2"

echo "== check: ${CHECK_GB} GiB qcow2, every 64 KiB cluster allocated (preallocation=metadata)"
qemu-img create -q -f qcow2 -o preallocation=metadata "$work/big.qcow2" "${CHECK_GB}G"
oc=("$ox" img check "$work/big.qcow2")
qc=(qemu-img check "$work/big.qcow2")
ab "check (${CHECK_GB} GiB, all clusters)" 0 oc qc
rm -f "$work/big.qcow2"

echo "== library: 4 KiB random I/O, ${IOPS_OPS} ops on 1 GiB, qcow2 (allocated) vs raw (ratio: qcow2/raw)"
dd if=/dev/zero of="$work/io.raw" bs=1M count=1024 status=none
"$ox" img convert -S 0 -O qcow2 "$work/io.raw" "$work/io.qcow2"
sync
for f in "$work/io.raw" "$work/io.qcow2"; do
    # Both files' page cache built alike, by readahead: as written by
    # different programs, one file's cache can be dearer to look up.
    dd if="$f" iflag=nocache count=0 status=none
    cat "$f" >/dev/null
done
printf '%-40s %10s %10s %7s   %-11s %9s %7s\n' "row (ops/s)" "qcow2" "raw" "ratio" "per cpu-s" "raw" "ratio"
most() { # "ops/s ops/cpu-s" lines -> the highest of each
    awk 'NR == 1 || $1 > w { w = $1 } NR == 1 || $2 > c { c = $2 } END { print w, c }' <<<"$1"
}
for mode in read write; do
    # In one process the files take turns, 20 rounds each (so load from
    # elsewhere falls on both alike); two runs, each file first once, and
    # each side's best.
    # sync: no run shares the disk with the last one's writeback.
    sync
    mapfile -t a < <("$iops" "$IOPS_OPS" $mode "$work/io.qcow2" "$work/io.raw")
    sync
    mapfile -t b < <("$iops" "$IOPS_OPS" $mode "$work/io.raw" "$work/io.qcow2")
    read -r qw qc <<<"$(most "${a[0]}"$'\n'"${b[1]}")"
    read -r rw rc <<<"$(most "${a[1]}"$'\n'"${b[0]}")"
    printf '%-40s %10s %10s %6.2fx   %11s %9s %6.2fx\n' "4k random $mode: qcow2 vs raw" "$qw" "$rw" \
        "$(awk -v a="$qw" -v b="$rw" 'BEGIN { print a / b }')" "$qc" "$rc" \
        "$(awk -v a="$qc" -v b="$rc" 'BEGIN { print a / b }')"
done
qemu-img check -q "$work/io.qcow2"
