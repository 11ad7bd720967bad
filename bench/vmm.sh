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
import os, resource, shutil, statistics, subprocess, time
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
def cpu_events_s(cmd):
    _, _, out, _ = run(cmd)
    for line in out.splitlines():
        if line.startswith("PROBE RESULT cpu"):
            return float(dict(w.split("=") for w in line.split()[3:])["events_s"])
    raise SystemExit(f"{cmd[0]}: no cpu result: {out[-500:]!r}")
def peak_rss_kib(cmd):
    """Peak RSS of one run, in a fresh interpreter child (ru_maxrss is per process)."""
    r = subprocess.run(["python3", "-c", "import resource,subprocess,sys;subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stdin=subprocess.DEVNULL);print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)", *cmd], capture_output=True, text=True)
    return int(r.stdout.strip())
# SCHED_FIFO (root only) gives the vCPU thread a whole core whatever else
# the host runs, so the cpu row compares guest speed, not the scheduler's
# share of a loaded machine; both VMMs get the same treatment.
fifo = ["chrt", "-f", "1"] if os.geteuid() == 0 and shutil.which("chrt") else []
vmms = {"oxvirt": oxvirt, "qemu": qemu}
res = {name: {"first": [], "exit": [], "over": [], "fifo": [], "cfs": []} for name in vmms}
# Every row alternates the two VMMs run by run, so load from elsewhere
# falls on both alike.
for _ in range(int(env["RUNS"])):
    for name, mk in vmms.items():
        f, e, _, _ = run(mk(env["PROBE"], "probe=hello"))
        res[name]["first"].append(f); res[name]["exit"].append(e)
for _ in range(3):
    for name, mk in vmms.items():
        res[name]["over"].append(overhead(mk(env["PROBE"], "probe=mem probe.mib=32"))[0])
for _ in range(max(3, int(env["RUNS"]))):
    for name, mk in vmms.items():
        cmd = mk(env["PROBE"], "probe=cpu probe.events=2000")
        res[name]["fifo"].append(cpu_events_s(fifo + cmd))
        res[name]["cfs"].append(cpu_events_s(cmd))
rows = []
for name, mk in vmms.items():
    r = res[name]
    kernel = ".peer/kernel/vmlinux"
    if name == "qemu":
        _, lv, _, _ = run(qemu(kernel, "console=ttyS0 earlyprintk=ttyS0 noxsave", ("-cpu", "host,-arch-capabilities,-cx16")), until="Linux version")
    else:
        _, lv, _, _ = run(oxvirt(kernel, "console=ttyS0 earlyprintk=ttyS0", ("--cpu-profile", "pvm-compat")), until="Linux version")
    rows.append((name, median(r["first"]), median(r["exit"]), peak_rss_kib(mk(env["PROBE"], "probe=hello")) / 1024,
                 median(r["over"]) / 1024, median(r["fifo"]), median(r["cfs"]), lv))
o, q = rows
print(f"{'figure':48} {'oxvirt':>10} {'qemu':>10} {'ratio':>7}")
fifo_label = "cpu events/s, SCHED_FIFO (median)" if fifo else "cpu events/s, no chrt: not root (median)"
labels = ["start to first serial byte (s, median)", "start to exit, probe=hello (s, median)",
          "peak RSS, probe=hello, 64M guest (MiB)", "RSS beyond touched guest RAM (MiB, med of 3)",
          fifo_label, "cpu events/s, default scheduling (median)", "start to 'Linux version' (s)"]
for i, label in enumerate(labels, 1):
    print(f"{label:48} {o[i]:10.3f} {q[i]:10.3f} {o[i]/q[i]:7.2f}")
PY
