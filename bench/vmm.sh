#!/usr/bin/env bash
# oxvirt vmm vs QEMU -M microvm on the same probe guest, same memory and
# vCPUs, in one run; prints each figure and the oxvirt/QEMU ratio.
# Usage: bash bench/vmm.sh [runs]   (needs KVM, .peer/qemu, .peer/kernel)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
cargo build --release -q -p oxvirt-cli -p oxvirt-probe
target=${CARGO_TARGET_DIR:-target}
export OXVIRT=$target/release/oxvirt PROBE=$target/release/oxvirt-probe RUNS=$runs
export QEMU=.peer/qemu/usr/bin/qemu-system-x86_64 QEMU_FW=.peer/qemu/usr/share/qemu
python3 - <<'PY'
import os, resource, statistics, subprocess, time
env = os.environ
def oxvirt(kernel, cmdline, extra=()):
    return [env["OXVIRT"], "vmm", "--kernel", kernel, "--cmdline", cmdline,
            "--memory", "64M", "--vcpus", "1", *extra]
def qemu(kernel, cmdline, extra=()):
    # The command line crates/testkit/src/qemu.rs (Microvm) builds.
    return [env["QEMU"], "-L", env["QEMU_FW"], "-M", "microvm", "-cpu", "host,-arch-capabilities",
            "-enable-kvm", "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
            "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-m", "64M", "-smp", "1", "-kernel", kernel, "-append", cmdline, *extra]
def run(cmd, until=None, timeout=120):
    """(seconds to first stdout byte, seconds to `until` or exit, output, max RSS KiB)"""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, out, t_until = None, b"", None
    while True:
        b = p.stdout.read1(65536)
        if not b: break
        if first is None: first = time.monotonic() - t0
        out += b
        if until and until.encode() in out:
            t_until = time.monotonic() - t0; p.kill(); break
        if time.monotonic() - t0 > timeout: p.kill(); break
    p.wait()
    end = t_until or (time.monotonic() - t0)
    return first, end, out.decode(errors="replace"), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
def median(f): return statistics.median(f)
def smaps_rss(pid, guest_bytes):
    """(total RSS KiB, RSS KiB of the guest RAM mapping) from /proc/PID/smaps.
    The guest RAM is the anonymous mapping of guest size (QEMU may add a
    little alignment), the one with the most resident pages."""
    total, guest, cur = 0, 0, None
    for line in open(f"/proc/{pid}/smaps"):
        f = line.split()
        if "-" in f[0] and ":" not in f[0]:
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            cur = {"size": hi - lo, "anon": len(f) < 6}
        elif f[0] == "Rss:":
            kib = int(f[1]); total += kib
            if cur["anon"] and guest_bytes <= cur["size"] <= guest_bytes + (4 << 20):
                guest = max(guest, kib)
    return total, guest
def overhead(cmd):
    """VMM resident memory beyond the guest RAM it touched (KiB), sampled
    while probe=mem keeps 32 MiB of a 64 MiB guest busy; and that RAM's RSS."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = b""
    while b"PROBE RESULT mem pass=2 " not in out:
        b = p.stdout.read1(65536)
        if not b: raise SystemExit(f"{cmd[0]}: probe=mem ended early: {out[-500:]!r}")
        out += b
    total, guest = smaps_rss(p.pid, 64 << 20)
    p.kill(); p.wait()
    return total - guest, guest
rows = []
for name, mk in (("oxvirt", oxvirt), ("qemu", qemu)):
    firsts, exits, rss, eps = [], [], [], []
    for _ in range(int(env["RUNS"])):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        f, e, out, _ = run(mk(env["PROBE"], "probe=hello"))
        firsts.append(f); exits.append(e)
    # Peak RSS of one hello run in a fresh interpreter child (ru_maxrss is per process).
    r = subprocess.run(["python3", "-c", "import resource,subprocess,sys;subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stdin=subprocess.DEVNULL);print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)", *mk(env["PROBE"], "probe=hello")], capture_output=True, text=True)
    rss = int(r.stdout.strip())
    over = [overhead(mk(env["PROBE"], "probe=mem probe.mib=32")) for _ in range(3)]
    over_kib = median([o for o, _ in over])
    for _ in range(3):
        _, _, out, _ = run(mk(env["PROBE"], "probe=cpu probe.events=2000"))
        for line in out.splitlines():
            if line.startswith("PROBE RESULT cpu"):
                eps.append(float(dict(w.split("=") for w in line.split()[3:])["events_s"]))
    kernel = ".peer/kernel/vmlinux"
    extra = ("--cpu-profile", "pvm-compat") if name == "oxvirt" else ()
    if name == "qemu":
        _, lv, _, _ = run(qemu(kernel, "console=ttyS0 earlyprintk=ttyS0 noxsave", ("-cpu", "host,-arch-capabilities,-cx16")), until="Linux version")
    else:
        _, lv, _, _ = run(oxvirt(kernel, "console=ttyS0 earlyprintk=ttyS0", extra), until="Linux version")
    rows.append((name, median(firsts), median(exits), rss / 1024, over_kib / 1024, median(eps), lv))
o, q = rows
print(f"{'figure':44} {'oxvirt':>10} {'qemu':>10} {'ratio':>7}")
labels = ["start to first serial byte (s, median)", "start to exit, probe=hello (s, median)",
          "peak RSS, probe=hello, 64M guest (MiB)", "RSS beyond touched guest RAM (MiB, med of 3)",
          "cpu events/s (median of 3)", "start to 'Linux version' (s)"]
for i, label in enumerate(labels, 1):
    print(f"{label:44} {o[i]:10.3f} {q[i]:10.3f} {o[i]/q[i]:7.2f}")
PY
