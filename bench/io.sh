#!/usr/bin/env bash
# oxvirt vmm vs QEMU -M microvm: virtio-blk and virtio-net with the same
# virtio probe guest, the same raw image (on /var/tmp, not tmpfs) and the
# same tap set-up, in one run; prints each figure and the oxvirt/QEMU ratio.
# Usage: bash bench/io.sh [runs]   (root, KVM, /dev/net/tun, perf, .peer/qemu)
# ROWS=REGEX keeps only the figures whose label matches (e.g. ROWS='seq').
# The two VMMs alternate run by run, so load from elsewhere hits both alike.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
target=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p oxvirt-cli -p oxvirt-probe
# The virtio probe needs its own target dir (see testkit's probe_kernel_virtio).
cargo build --release -q -p oxvirt-probe --features virtio --target-dir "$target/probe-virtio"
export OXVIRT=$target/release/oxvirt PROBE=$target/probe-virtio/release/oxvirt-probe RUNS=$runs
export ROWS=${ROWS:-}
export QEMU=.peer/qemu/usr/bin/qemu-system-x86_64 QEMU_FW=.peer/qemu/usr/share/qemu
work=$(mktemp -d /var/tmp/oxvirt-bench-io.XXXXXX)
export IMG=$work/disk.raw NS=oxbench-io-$$ TAP=oxbio$$
cleanup() { ip netns del "$NS" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
truncate -s 512M "$IMG"
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" tuntap add dev "$TAP" mode tap vnet_hdr
ip -n "$NS" link set "$TAP" up
ip -n "$NS" addr add 10.78.0.1/24 dev "$TAP"
python3 - <<'PY'
import os, re, statistics, subprocess, sys, tempfile, time
env = os.environ
MEM = "96M"
# microvm's virtio-mmio slots, filled from the last one down (testkit's Microvm).
def mmio(n):
    return " ".join(f"virtio_mmio.device=512@{0xfeb00000 + (23 - i) * 512:#x}:{24 + 23 - i}"
                    for i in range(n))
def oxvirt(cmdline, dev):
    return [env["OXVIRT"], "vmm", "--kernel", env["PROBE"], "--memory", MEM, "--vcpus", "1",
            *dev, "--cmdline", cmdline]
def qemu(cmdline, dev):
    return [env["QEMU"], "-L", env["QEMU_FW"], "-M", "microvm", "-cpu", "host,-arch-capabilities",
            "-enable-kvm", "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-m", MEM, "-smp", "1", "-kernel", env["PROBE"], "-append", f"{cmdline} {mmio(1)}",
            "-global", "virtio-mmio.force-legacy=false", *dev]
DISK = {"oxvirt": ["--disk", f"path={env['IMG']},format=raw"],
        "qemu": ["-drive", f"if=none,id=d0,format=raw,file={env['IMG']},cache=writeback",
                 "-device", "virtio-blk-device,drive=d0"]}
NET = {"oxvirt": ["--net", f"tap={env['TAP']}"],
       "qemu": ["-netdev", f"tap,id=n0,ifname={env['TAP']},script=no,downscript=no,vhost=off",
                "-device", "virtio-net-device,netdev=n0"]}
MAKE = {"oxvirt": oxvirt, "qemu": qemu}
def fields(line):
    return dict(w.split("=", 1) for w in line.split() if "=" in w)
def run_until(cmd, marker, timeout=300):
    """Runs cmd until a stdout line containing marker; (line, Popen) with the VM still up."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out, t0 = b"", time.monotonic()
    # The whole line: a read may end in the middle of it.
    while not re.search(re.escape(marker).encode() + rb".*\n", out):
        b = p.stdout.read1(65536)
        if not b or time.monotonic() - t0 > timeout:
            p.kill(); p.wait()
            raise SystemExit(f"{cmd[0]}: no '{marker}': {out[-800:]!r} {p.stderr.read()[-800:]!r}")
        out += b
    line = next(l for l in out.decode(errors="replace").splitlines() if marker in l)
    return line, p
def blk(tool, mode, mib, bs, perf=None):
    cmd = MAKE[tool](f"probe=blk probe.mode={mode} probe.mib={mib} probe.bs={bs}", DISK[tool])
    if perf:
        cmd = ["perf", "stat", "-x,", "-o", perf, "-e", ",".join(EVENTS), "--", *cmd]
    line, p = run_until(cmd, "PROBE RESULT blk")
    p.wait(60) if perf else (p.kill(), p.wait())
    return fields(line)
def net(tool, mib):
    """TCP echo MB/s of `mib` MiB from inside the netns to the guest."""
    cmd = ["ip", "netns", "exec", env["NS"], *MAKE[tool]("probe=net probe.ip=10.78.0.2/24 probe.port=7", NET[tool])]
    _, p = run_until(cmd, "PROBE RESULT net listening")
    try:
        r = subprocess.run(["ip", "netns", "exec", env["NS"], "python3", "-c", CLIENT, str(mib)],
                           capture_output=True, text=True, timeout=300)
        if r.returncode: raise SystemExit(f"{tool} net client: {r.stderr}")
        return float(r.stdout)
    finally:
        p.kill(); p.wait()
CLIENT = r'''
import socket, sys, threading, time
n = int(sys.argv[1]) << 20
data = bytes((i * 7 + (i >> 13)) & 0xff for i in range(1 << 20)) * (n >> 20)
def connect():
    for _ in range(100):
        try: return socket.create_connection(("10.78.0.2", 7), timeout=30)
        except OSError: time.sleep(0.1)
    raise SystemExit("cannot connect to the guest")
s = connect()
t0 = time.monotonic()
sender = threading.Thread(target=s.sendall, args=(data,)); sender.start()
got = bytearray()
while len(got) < n:
    b = s.recv(1 << 20)
    if not b: break
    got += b
sender.join(); dt = time.monotonic() - t0; s.close()
if bytes(got) != data: raise SystemExit(f"echo differs ({len(got)} of {n} bytes)")
q = connect(); q.sendall(b"quit"); q.close()
print(n / dt / 1e6)
'''
# kvm:kvm_exit never fires on this host (kvm_pvm has its own exit path), so
# exits are counted as MMIO accesses KVM handled (kvm:kvm_mmio, every one an
# exit, ioeventfd ones included) and returns from KVM_RUN to the VMM process
# (kvm:kvm_userspace_exit).
EVENTS = ("kvm:kvm_mmio", "kvm:kvm_userspace_exit")
def counts(path):
    found = {}
    for line in open(path):
        f = line.strip().split(",")
        if len(f) > 2 and f[2] in EVENTS: found[f[2]] = int(f[0])
    if len(found) != len(EVENTS): raise SystemExit(f"perf counted no {EVENTS} in {path}")
    return found
def exits_per_request(tool, mode):
    """Exits of a 4 KiB run minus those of a run 8x shorter, per extra request
    (boot and set-up cancel out): (MMIO exits, exits to the VMM)."""
    with tempfile.TemporaryDirectory() as d:
        small, big = f"{d}/small", f"{d}/big"
        a = blk(tool, mode, 4, 4096, small); b = blk(tool, mode, 32, 4096, big)
        n = int(b["requests"]) - int(a["requests"])
        cs, cb = counts(small), counts(big)
        return tuple((cb[e] - cs[e]) / n for e in EVENTS)
runs = int(env["RUNS"])
def one(f): return lambda t: (f(t),)
rows = [
    (("seq write, 1 MiB requests (MB/s)",), one(lambda t: float(blk(t, "seqwrite", 256, 1 << 20)["mb_s"]))),
    (("seq read, 1 MiB requests (MB/s)",), one(lambda t: float(blk(t, "seqread", 256, 1 << 20)["mb_s"]))),
    (("rand write, 4 KiB (IOPS)",), one(lambda t: float(blk(t, "randwrite", 32, 4096)["iops"]))),
    (("rand read, 4 KiB (IOPS)",), one(lambda t: float(blk(t, "randread", 32, 4096)["iops"]))),
    (("TCP echo over tap, 20 MiB (MB/s)",), one(lambda t: net(t, 20))),
    (("MMIO exits per 4 KiB rand read", "exits to VMM per 4 KiB rand read"),
     lambda t: exits_per_request(t, "randread")),
    (("MMIO exits per 4 KiB rand write", "exits to VMM per 4 KiB rand write"),
     lambda t: exits_per_request(t, "randwrite")),
]
print(f"{'figure (median of ' + str(runs) + ')':40} {'oxvirt':>10} {'qemu':>10} {'ratio':>7}")
# The image is written once before the first read so reads see data, not holes.
blk("oxvirt", "seqwrite", 256, 1 << 20)
def ratio(o, q): return f"{o / q:7.2f}" if q else f"{'-':>7}"
for labels, measure in rows:
    if not any(re.search(env["ROWS"], l) for l in labels): continue
    got = {"oxvirt": [], "qemu": []}
    for _ in range(runs):
        for tool in got: got[tool].append(measure(tool))
    o, q = ([statistics.median(v) for v in zip(*got[t])] for t in got)
    each = " ".join(f"{a[0]:.0f}/{b[0]:.0f}" for a, b in zip(got["oxvirt"], got["qemu"]))
    print(f"  {labels[0]}: runs oxvirt/qemu {each}", file=sys.stderr, flush=True)
    for label, ov, qv in zip(labels, o, q):
        print(f"{label:40} {ov:10.2f} {qv:10.2f} {ratio(ov, qv)}", flush=True)
PY
