#!/usr/bin/env bash
# Live migration, oxvirt vmm vs QEMU -M microvm, in one run: the probe
# guest's `mem` workload (verifying every page) migrated over a unix socket
# on this machine at several dirty rates and downtime limits; prints
# total-time, downtime and ram.transferred of each and the oxvirt/QEMU ratios.
# Usage: bash bench/migrate.sh [guest MiB] [working set MiB] [max-bandwidth B/s]
# Environment: ROWS (see below), MULTIFD (multifd channel counts, "" skips
# the multifd rows), LINK_MIB (per-connection rate of the relayed link in the
# multifd rows, default 64), LOGDIR (keep each VMM's stderr there), PASSES=1
# (print ram.transferred per dirty-sync pass, sampled by query-migrate).
# (needs KVM and .peer/qemu)
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p oxvirt-cli -p oxvirt-probe
export OXVIRT=$target/release/oxvirt PROBE=$target/release/oxvirt-probe
export QEMU=.peer/qemu/usr/bin/qemu-system-x86_64 QEMU_FW=.peer/qemu/usr/share/qemu
export GUEST_MIB=${1:-1024} WORK_MIB=${2:-256} MAX_BW=${3:-1073741824}
work=$(mktemp -d /var/tmp/oxvirt-bench-migrate.XXXXXX)
trap 'rm -rf "$work"' EXIT
export WORK=$work
python3 - <<'PY'
import json, os, re, socket, subprocess, threading, time
env = os.environ
W = env["WORK"]
TIMEOUT = 90  # seconds a migration may take before it is cancelled

def cmdline(rate):
    # probe.dirty_mib_s has a minimum of 1: "0" is 1 MiB/s, a pass every WORK_MIB s.
    return (f"probe=mem probe.mib={env['WORK_MIB']} probe.dirty_mib_s={max(rate, 1)} "
            "probe.verify=1")
def oxvirt(rate, tag, api=None, incoming=None):
    cmd = [env["OXVIRT"], "vmm", "--kernel", env["PROBE"], "--memory", f"{env['GUEST_MIB']}M",
           "--vcpus", "1", "--cmdline", cmdline(rate), "--serial", f"file:{W}/{tag}.console"]
    if api: cmd += ["--api", api]
    if incoming: cmd += ["--incoming", incoming]
    return cmd
def qemu(rate, tag, api=None, incoming=None):
    cmd = [env["QEMU"], "-L", env["QEMU_FW"], "-M", "microvm", "-cpu", "host,-arch-capabilities",
           "-enable-kvm", "-nodefaults", "-no-user-config", "-no-reboot", "-display", "none",
           "-serial", f"file:{W}/{tag}.console", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
           "-m", f"{env['GUEST_MIB']}M", "-smp", "1", "-kernel", env["PROBE"],
           "-append", cmdline(rate), "-global", "virtio-mmio.force-legacy=false"]
    if api: cmd += ["-qmp", f"unix:{api},server=on,wait=off"]
    if incoming: cmd += ["-incoming", incoming]
    return cmd

class Qmp:
    """JSON lines over a unix socket: greeting, qmp_capabilities, then commands."""
    def __init__(self, path):
        for _ in range(300):
            try:
                self.s = socket.socket(socket.AF_UNIX); self.s.connect(path); break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit(f"no control socket at {path}")
        self.f = self.s.makefile("rw")
        self.reply()  # the greeting
        self.ok("qmp_capabilities")
    def reply(self):
        while True:
            line = self.f.readline()
            if not line: raise SystemExit("control socket closed")
            msg = json.loads(line)
            if "event" not in msg: return msg
    def ok(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args} if args else {"execute": name}) + "\n")
        self.f.flush()
        msg = self.reply()
        if "return" not in msg: raise SystemExit(f"{name}: {msg}")
        return msg["return"]

def relay(listen, target, mib_s):
    """A link that carries each connection at most mib_s MiB/s forward (a
    path whose rate is limited per flow, as a long-distance TCP window is):
    one connection moves mib_s, N parallel ones N times that."""
    srv = socket.socket(socket.AF_UNIX); srv.bind(listen); srv.listen(16)
    def pump(a, b, rate):
        t0, sent = time.monotonic(), 0
        while True:
            try: data = a.recv(256 << 10)
            except OSError: data = b""
            if not data: break
            try: b.sendall(data)
            except OSError: break
            sent += len(data)
            if rate:
                due = t0 + sent / rate
                if due > time.monotonic(): time.sleep(max(0, due - time.monotonic()))
        for s_ in (a, b):
            try: s_.shutdown(socket.SHUT_RDWR)
            except OSError: pass
    def serve():
        while True:
            try: c, _ = srv.accept()
            except OSError: return
            d = socket.socket(socket.AF_UNIX)
            try: d.connect(target)
            except OSError: c.close(); continue
            threading.Thread(target=pump, args=(c, d, mib_s * 2**20), daemon=True).start()
            threading.Thread(target=pump, args=(d, c, 0), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    return srv

def console(tag):
    try: return open(f"{W}/{tag}.console", errors="replace").read()
    except FileNotFoundError: return ""
def wait_for(tag, pattern, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        m = re.findall(pattern, console(tag))
        if m: return m
        time.sleep(0.1)
    return None
def rates(text):
    return [float(x) for x in re.findall(r"PROBE RESULT mem pass=\d+ .*?dirty_mib_s=([\d.]+) verify=", text)]

def migrate(tool, rate, limit, channels=0, max_bw=None, link_mib=None, prefix="row"):
    """One migration; channels > 0: multifd with that many page connections;
    link_mib: through a relay carrying each connection at that rate."""
    mk = oxvirt if tool == "oxvirt" else qemu
    tag = f"{prefix}-{tool}-{rate}-{limit}-{channels}"
    api, mig = f"{W}/{tag}.api", f"unix:{W}/{tag}.mig"
    via = f"unix:{W}/{tag}.link" if link_mib else mig
    params = {"downtime-limit": limit, "max-bandwidth": max_bw or int(env["MAX_BW"])}
    caps = []
    if channels:
        params["multifd-channels"] = channels
        caps = [{"capability": "multifd", "state": True}]
    # QEMU's destination must enable multifd before it listens: -incoming defer.
    defer = tool == "qemu" and channels
    dst_api = f"{W}/{tag}-dst.api"
    logs = env.get("LOGDIR") or W
    src = subprocess.Popen(mk(rate, tag + "-src", api=api), stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=open(f"{logs}/{tag}-src.log", "w"))
    dst_cmd = (mk(rate, tag + "-dst", api=dst_api, incoming="defer") if defer
               else mk(rate, tag + "-dst", incoming=mig))
    dst = subprocess.Popen(dst_cmd, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=open(f"{logs}/{tag}-dst.log", "w"))
    link = relay(via[5:], mig[5:], link_mib) if link_mib else None
    try:
        if defer:
            d = Qmp(dst_api)
            d.ok("migrate-set-capabilities", capabilities=caps)
            d.ok("migrate-set-parameters", **{"multifd-channels": channels})
            d.ok("migrate-incoming", uri=mig)
        if not wait_for(tag + "-src", r"fill_mib", 120):
            raise SystemExit(f"{tag}: the source never filled its memory: {console(tag + '-src')[-500:]}")
        if rate > 1:  # a pass at full rate before migrating: the rate it reaches unhindered
            wait_for(tag + "-src", r"pass=1 ", int(env["WORK_MIB"]) / rate * 3 + 10)
        before = len(console(tag + "-src"))
        q = Qmp(api)
        if caps: q.ok("migrate-set-capabilities", capabilities=caps)
        q.ok("migrate-set-parameters", **params)
        q.ok("migrate", uri=via)
        t0 = time.monotonic()
        passes = {}  # dirty-sync-count -> ram.transferred when it was first seen
        while True:
            info = q.ok("query-migrate")
            ram = info.get("ram", {})
            passes.setdefault(ram.get("dirty-sync-count", 0), ram.get("transferred", 0))
            if info.get("status") in ("completed", "failed", "cancelled"): break
            if time.monotonic() - t0 > TIMEOUT:
                q.ok("migrate_cancel")
                during = rates(console(tag + "-src")[before:])
                return {"status": f"did not converge in {TIMEOUT}s", "during": during}
            time.sleep(0.05)
        during = rates(console(tag + "-src")[before:])
        verified = None
        if info["status"] == "completed" and rate > 1:
            # The guest carries on at the destination and its pages check out.
            verified = bool(wait_for(tag + "-dst", r"pass=\d+ .*verify=ok", int(env["WORK_MIB"]) / rate * 3 + 10))
        if "PROBE DONE fail" in console(tag + "-dst"): verified = False
        pre = rates(console(tag + "-src")[:before])
        return {"status": info["status"], "total": info.get("total-time"), "down": info.get("downtime"),
                "bytes": info.get("ram", {}).get("transferred"), "pre": pre, "during": during,
                "verified": verified, "passes": passes}
    finally:
        if link: link.close()
        for p in (src, dst):
            p.kill(); p.wait()

def fmt_rate(r):
    if not r["pre"] and not r["during"]: return "-"
    pre = f"{r['pre'][-1]:.0f}" if r["pre"] else "-"
    during = f"{min(r['during']):.0f}" if r["during"] else "-"
    return f"{pre}/{during}"
def pass_bytes(r):
    """MiB sent between sampled dirty syncs (query-migrate every 50 ms)."""
    p = sorted(r["passes"].items())
    marks = [t for _, t in p] + [r["bytes"]]
    return " ".join(f"{n}:{(b - a) / 2**20:.1f}" for (n, _), a, b in zip(p, marks, marks[1:]))
def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"

print(f"guest {env['GUEST_MIB']} MiB, probe.mem working set {env['WORK_MIB']} MiB, "
      f"max-bandwidth {int(env['MAX_BW']) >> 20} MiB/s, unix socket")
print("dirty: requested MiB/s; achieved = last pass before / slowest pass during migration")
hdr = (f"{'dirty':>5} {'limit':>5} {'tool':7} {'status':10} {'total ms':>9} {'down ms':>8} "
       f"{'MiB sent':>9} {'achieved':>9} {'verify':>6}")
print(hdr)
# ROWS="200:300 50:30" runs only those (dirty rate:downtime limit) rows, ROWS="" none.
rows = ([tuple(map(int, r.split(":"))) for r in env["ROWS"].split()] if "ROWS" in env
        else [(rate, limit) for rate in (0, 50, 200) for limit in (30, 300)])
for rate, limit in rows:
    results = {t: migrate(t, rate, limit) for t in ("oxvirt", "qemu")}
    for tool, r in results.items():
        if r["status"] != "completed":
            print(f"{rate:5} {limit:5} {tool:7} {r['status']}"); continue
        print(f"{rate:5} {limit:5} {tool:7} {r['status']:10} {r['total']:9} {r['down']:8} "
              f"{r['bytes'] / 2**20:9.1f} {fmt_rate(r):>9} {str(r['verified']):>6}")
        if env.get("PASSES"): print(f"{'':5} {'':5} {'':7} MiB after sync n: {pass_bytes(r)}")
    o, q = results["oxvirt"], results["qemu"]
    if o["status"] == q["status"] == "completed":
        print(f"{'':5} {'':5} {'ratio':7} {'':10} {ratio(o['total'], q['total']):>9} "
              f"{ratio(o['down'], q['down']):>8} {ratio(o['bytes'], q['bytes']):>9}", flush=True)

# multifd: the same guest (200 MiB/s, 300 ms) with bandwidth unlimited, over
# one connection and with multifd page connections; throughput is
# ram.transferred / total-time. Then a guest dirtying 20 MiB/s over a link
# that carries each connection at LINK_MIB MiB/s (the relay above), where
# parallel connections are what makes a migration faster.
# MULTIFD="" skips both, MULTIFD="2 4" picks the channel counts.
counts = [int(c) for c in env.get("MULTIFD", "2").split()]
link_mib = int(env.get("LINK_MIB", "64"))
big = 64 << 30
for title, rate, link in ((f"dirty 200 MiB/s, downtime-limit 300 ms, max-bandwidth {big >> 30} GiB/s", 200, None),
                          (f"dirty 20 MiB/s, downtime-limit 300 ms, each connection carried at {link_mib} MiB/s", 20, link_mib)):
    if not counts: break
    print(f"\nmultifd: {title}")
    print(f"{'tool':7} {'channels':>8} {'status':10} {'total ms':>9} {'down ms':>8} {'MiB sent':>9} "
          f"{'MiB/s':>7} {'vs 1':>5} {'verify':>6}")
    single = {}
    # Tools and channel counts alternate run by run, so load hits all alike.
    for channels in [0] + counts:
        for tool in ("oxvirt", "qemu"):
            r = migrate(tool, rate, 300, channels, big, link, prefix="link" if link else "mf")
            name = "1 conn" if channels == 0 else f"{channels}"
            if r["status"] != "completed":
                print(f"{tool:7} {name:>8} {r['status']}"); continue
            mib_s = r["bytes"] / 2**20 / max(r["total"], 1) * 1000
            if channels == 0: single[tool] = mib_s
            print(f"{tool:7} {name:>8} {r['status']:10} {r['total']:9} {r['down']:8} "
                  f"{r['bytes'] / 2**20:9.1f} {mib_s:7.0f} {ratio(mib_s, single.get(tool)):>5} "
                  f"{str(r['verified']):>6}", flush=True)
PY
