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
    rows.append((name, median(firsts), median(exits), rss / 1024, median(eps), lv))
o, q = rows
print(f"{'figure':44} {'oxvirt':>10} {'qemu':>10} {'ratio':>7}")
labels = ["start to first serial byte (s, median)", "start to exit, probe=hello (s, median)",
          "peak RSS, probe=hello, 64M guest (MiB)", "cpu events/s (median of 3)", "start to 'Linux version' (s)"]
for i, label in enumerate(labels, 1):
    print(f"{label:44} {o[i]:10.3f} {q[i]:10.3f} {o[i]/q[i]:7.2f}")
PY
