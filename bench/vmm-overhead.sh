#!/usr/bin/env bash
# The "RSS beyond touched guest RAM" row of bench/vmm.sh on its own, for
# comparing builds of `oxvirt`: the binaries' file pages are dropped from
# the page cache first, then every run starts each binary in turn
# (interleaved, so page cache and load fall on all alike) and the medians
# are printed with a split by mapping (binary text, its other mappings,
# shared libraries, anonymous memory).
# Usage: bash bench/vmm-overhead.sh [runs] OXVIRT_BINARY...
#   (default: runs 5, $CARGO_TARGET_DIR/release/oxvirt; needs KVM and the
#    release probe guest, or PROBE=path)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
shift || true
target=${CARGO_TARGET_DIR:-target}
export RUNS=$runs PROBE=${PROBE:-$target/release/oxvirt-probe}
[ $# -gt 0 ] || set -- "$target/release/oxvirt"
python3 - "$@" <<'PY'
import os, statistics, subprocess, sys
env = os.environ
GUEST = 64 << 20
def cmd(oxvirt):
    return [oxvirt, "vmm", "--kernel", env["PROBE"], "--cmdline", "probe=mem probe.mib=32",
            "--memory", "64M", "--vcpus", "1"]
def split(pid, binary):
    """KiB by part, as bench/vmm.sh's overhead() counts: every Rss in
    /proc/PID/smaps except the guest RAM mapping's (anonymous, guest size,
    the one with the most resident pages)."""
    parts, cur, guest = {}, None, 0
    for line in open(f"/proc/{pid}/smaps"):
        f = line.split()
        if "-" in f[0] and ":" not in f[0]:
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            path = f[5] if len(f) > 5 else ""
            if os.path.realpath(path) == binary:
                part = "oxvirt " + ("text" if "x" in f[1] else f[1])
            elif path.startswith("/"):
                part = "libs"
            else:
                part = "anon"
            cur = (part, hi - lo, len(f) < 6)
        elif f[0] == "Rss:":
            kib = int(f[1])
            parts[cur[0]] = parts.get(cur[0], 0) + kib
            if cur[2] and GUEST <= cur[1] <= GUEST + (4 << 20):
                guest = max(guest, kib)
    parts["anon"] -= guest
    parts["total"] = sum(parts.values())
    return parts
def overhead(binary):
    p = subprocess.Popen(cmd(binary), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    out = b""
    while b"PROBE RESULT mem pass=2 " not in out:
        b = p.stdout.read1(65536)
        if not b:
            p.wait()
            raise SystemExit(f"{binary}: probe=mem ended early (status {p.returncode}): "
                             f"{out[-500:]!r} {p.stderr.read()[-500:]!r}")
        out += b
    parts = split(p.pid, os.path.realpath(binary))
    p.kill(); p.wait()
    return parts
binaries = sys.argv[1:]
# Text RSS counts the pages fault-around finds in the page cache, which
# depends on how the file got there (written by the linker, copied, read):
# every binary starts from the disk alike.
os.sync()
for b in binaries:
    fd = os.open(b, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
res = {b: [] for b in binaries}
for _ in range(int(env["RUNS"])):
    for b in binaries:
        res[b].append(overhead(b))
keys = sorted({k for runs in res.values() for r in runs for k in r} - {"total"}) + ["total"]
print(f"{'binary':40} " + " ".join(f"{k:>13}" for k in keys) + "  (KiB, median)")
for b, runs in res.items():
    med = [statistics.median(r.get(k, 0) for r in runs) for k in keys]
    print(f"{b[-40:]:40} " + " ".join(f"{m:13.0f}" for m in med))
    print(f"{'':40} total MiB: {med[-1] / 1024:.2f} (runs: "
          + ", ".join(f"{r['total'] / 1024:.2f}" for r in runs) + ")")
PY
