#!/usr/bin/env bash
# The README's main job: build oxvirt and show it working on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace
target="${CARGO_TARGET_DIR:-target}"
ox="$target/release/oxvirt"
probe="$target/release/oxvirt-probe"
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

echo "== oxvirt vmm: the probe guest boots through PVH on KVM (its console below)"
# The probe reports through the debug-exit port: status (0 << 1) | 1 = 1 means it said ok.
boot_probe() {
    local status=0
    $ox vmm --memory 96M "$@" || status=$?
    [ "$status" -eq 1 ] || { echo "demo: the probe guest failed (exit status $status)"; exit 1; }
}
boot_probe --kernel "$probe" --vcpus 2 --cmdline 'probe=smp'
boot_probe --kernel "$probe" --cmdline 'probe=cpu probe.events=200'

echo "== oxvirt vmm: Debian's kernel with a busybox initramfs (optional; at most 45 s)"
# A shell prompt where KVM runs guest ring 0 natively; on kvm_pvm hosts the
# kernel's early boot, as far as the ring-0 emulator lets it go.
bash scripts/boot-linux.sh 45 || echo "demo: the Linux boot did not reach a shell prompt (optional step)"

echo "== oxvirt vmm: virtio-blk (qcow2, 1 MiB/s write limit) and virtio-rng, driven by the guest's virtio-drivers"
cargo build --release -p oxvirt-probe --features virtio --target-dir "$target/probe-virtio"
vprobe="$target/probe-virtio/release/oxvirt-probe"
$ox img create -f qcow2 "$work/vm.qcow2" 32M
boot_probe --kernel "$vprobe" --disk "path=$work/vm.qcow2,write_bps=1M" \
    --cmdline 'probe=blk probe.mode=seqwrite probe.mib=2 probe.bs=65536 probe.verify=1 probe.seed=7'
qemu-img check "$work/vm.qcow2"
boot_probe --kernel "$vprobe" --rng --cmdline 'probe=rng probe.bytes=65536'

echo "== oxvirt vmm: live migration between two VMM processes (the guest checks every page on arrival)"
mem='probe=mem probe.mib=16 probe.dirty_mib_s=8 probe.verify=1'
$ox vmm --kernel "$probe" --memory 64M --cmdline "$mem" --serial "file:$work/src.txt" --api "$work/src.sock" &
src=$!
$ox vmm --kernel "$probe" --memory 64M --cmdline "$mem" --serial "file:$work/dst.txt" --api "$work/dst.sock" \
    --incoming "unix:$work/mig.sock" &
dst=$!
sleep 2
python3 - "$work" <<'PY'
import json, socket, sys, time
def session(path):
    s = socket.socket(socket.AF_UNIX); s.connect(path); f = s.makefile("rw"); f.readline(); return f
def run(f, cmd, args=None):
    f.write(json.dumps({"execute": cmd, "arguments": args or {}}) + "\n"); f.flush()
    while True:
        reply = json.loads(f.readline())
        if "event" not in reply: return reply
src = session(sys.argv[1] + "/src.sock")
run(src, "migrate-set-parameters", {"downtime-limit": 30})
run(src, "migrate", {"uri": "unix:" + sys.argv[1] + "/mig.sock"})
while (info := run(src, "query-migrate")["return"])["status"] not in ("completed", "failed"):
    time.sleep(0.1)
print(json.dumps({k: info.get(k) for k in ("status", "total-time", "downtime")}), "ram:", json.dumps(info["ram"]))
time.sleep(1.5)
run(src, "quit"); run(session(sys.argv[1] + "/dst.sock"), "quit")
PY
wait $src $dst || true
echo "-- source console (last lines):"; tail -n 2 "$work/src.txt"
echo "-- destination console (the guest runs on):"; tail -n 2 "$work/dst.txt"

echo "== oxvirtd and the virsh-like verbs: a VM with Docker-style limits in real cgroups"
state="$work/state" rundir="$work/run"
$ox daemon --state-dir "$state" --run-dir "$rundir" > "$work/daemon.log" 2>&1 &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 50); do [ -S "$rundir/oxvirtd.sock" ] && break; sleep 0.1; done
c=(-c "$rundir/oxvirtd.sock")
$ox run "${c[@]}" --name demo --kernel "$probe" \
    --cmdline 'probe=mem probe.mib=16 probe.dirty_mib_s=4' --memory 256m --cpus 0.5 --cpu-shares 512
$ox list "${c[@]}" --all
$ox dominfo "${c[@]}" demo
$ox schedinfo "${c[@]}" demo
$ox destroy "${c[@]}" demo
$ox list "${c[@]}" --all
