#!/usr/bin/env bash
# Boots the Debian cloud kernel (scripts/fetch-kernel.sh) with a busybox
# initramfs (scripts/fetch-initramfs.sh) on `oxvirt vmm`, shows its console,
# types `uname -a` at the shell prompt and powers the VM off.
# Usage: bash scripts/boot-linux.sh [SECONDS]   (time bound, default 120)
#
# Where KVM runs guest ring 0 natively this reaches the prompt in seconds
# and exits 0, or 1 if it does not. On a kvm_pvm host (this project's
# machines) guest ring 0 runs in an instruction emulator that cannot take
# Linux past its int3 self-test (docs/vmm.md): the script says so, boots
# the PVH vmlinux under the pvm-compat CPU profile until the time bound or
# the emulator stops it, prints how far the kernel got, and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-120}
bash scripts/fetch-kernel.sh
bash scripts/fetch-initramfs.sh
target=${CARGO_TARGET_DIR:-target}
ox=$target/release/oxvirt
[ -x "$ox" ] || cargo build --release -q -p oxvirt-cli

if [ -d /sys/module/kvm_pvm ]; then
    emulated=1
    # PVH needs no decompressor run (~106 s of emulated ring 0 for the bzImage).
    vm=(--kernel .peer/kernel/vmlinux --cpu-profile pvm-compat)
    cmdline="console=ttyS0 earlyprintk=ttyS0"
    cat <<EOF
boot-linux: *********************************************************************
boot-linux: NOTE: this host's KVM is kvm_pvm: guest ring-0 code runs in an
boot-linux: instruction emulator (~1 M instructions/s) that cannot run Linux past
boot-linux: its int3 self-test. The kernel gets at most ${seconds} s and will NOT
boot-linux: reach the shell prompt here; a host whose KVM runs ring 0 natively does.
boot-linux: *********************************************************************
EOF
else
    emulated=0
    vm=(--kernel .peer/kernel/vmlinuz)
    cmdline="console=ttyS0 panic=-1"
fi
vm+=(--initrd .peer/initramfs/initramfs.cpio.gz --memory 256M --vcpus 2 --cmdline "$cmdline")
echo "boot-linux: $ox vmm ${vm[*]}"

python3 - "$seconds" "$emulated" "$ox" vmm "${vm[@]}" <<'PY'
import os, select, subprocess, sys, time
seconds, emulated, cmd = float(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:]
# What the console shows, in boot order, and what it means.
MILESTONES = [
    ("Linux version", "the kernel started"),
    ("Command line:", "the kernel read its command line"),
    ("RAMDISK: [mem", "the kernel found the initramfs"),
    ("x86/fpu:", "the FPU is set up"),
    ("Unpacking initramfs", "the kernel unpacks the initramfs"),
    ("Run /init as init process", "the kernel started /init"),
    ("oxvirt initramfs:", "/init mounted /proc, /sys and /dev"),
    ("oxvirt-guest:/# ", "a shell prompt"),
]
PROMPT = MILESTONES[-1][0]
vmm = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
start, console, typed, reached = time.monotonic(), b"", [], -1
def say(*line):
    print("boot-linux:", *line, flush=True)
while True:
    left = start + seconds - time.monotonic()
    if left <= 0:
        break
    ready, _, _ = select.select([vmm.stdout], [], [], min(left, 1.0))
    if ready:
        chunk = os.read(vmm.stdout.fileno(), 65536)
        if not chunk:
            break
        sys.stdout.buffer.write(chunk); sys.stdout.flush()
        console += chunk
        text = console.decode(errors="replace")
        while reached + 1 < len(MILESTONES) and MILESTONES[reached + 1][0] in text:
            reached += 1
        # At the prompt: one command, then power off (the VMM then exits 0).
        if PROMPT in text and not typed:
            typed.append(b"uname -a\n"); vmm.stdin.write(typed[-1]); vmm.stdin.flush()
        elif typed == [b"uname -a\n"] and text.count(PROMPT) >= 2:
            typed.append(b"poweroff -f\n"); vmm.stdin.write(typed[-1]); vmm.stdin.flush()
    elif vmm.poll() is not None:
        break
elapsed = time.monotonic() - start
if vmm.poll() is None:
    vmm.kill()
    how = f"stopped by the {seconds:.0f} s time bound"
else:
    err = vmm.stderr.read().decode(errors="replace").strip()
    how = f"the VMM exited with status {vmm.returncode}" + (f": {err}" if err else "")
vmm.wait()
if console and not console.endswith(b"\n"):
    print()
got = MILESTONES[reached][1] if reached >= 0 else "nothing on the console"
say(f"after {elapsed:.1f} s, {how}")
say(f"got as far as: {got}")
if reached == len(MILESTONES) - 1 and vmm.returncode == 0:
    say("reached the shell prompt, ran uname -a, powered off")
    sys.exit(0)
if emulated:
    say("this host's KVM emulates guest ring 0 (kvm_pvm): that is as far as it goes here (exit 0)")
    sys.exit(0)
say("FAILED: no shell prompt")
sys.exit(1)
PY
