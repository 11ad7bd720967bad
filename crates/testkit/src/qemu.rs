//! The peer VMM: Debian's QEMU 7.2, unpacked privately under `.peer/qemu`
//! by `scripts/fetch-qemu.sh`, run as `-M microvm` on the same probe guest
//! the oxvirt VMM runs. Also the one way tests run any VM process to its end
//! (`run_vm`), so QEMU and oxvirt runs are timed and parsed alike.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::paths::{peer_dir, probe_binary, workspace_root};
use crate::probe::ProbeOutput;
use crate::skip::require;

/// QEMU's binary: `$OXVIRT_QEMU`, else the private one from fetch-qemu.sh.
pub fn qemu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("OXVIRT_QEMU") {
        return PathBuf::from(path);
    }
    peer_dir().join("qemu/usr/bin/qemu-system-x86_64")
}

/// QEMU's firmware folder (`-L`): qboot as bios-microvm.bin, pvh.bin.
pub fn qemu_firmware_dir() -> PathBuf {
    peer_dir().join("qemu/usr/share/qemu")
}

/// The private QEMU is there; otherwise a loud SKIP (or a failure in CI).
pub fn require_qemu() -> bool {
    let qemu = qemu_binary();
    require(
        qemu.is_file(),
        &format!(
            "QEMU peer {} is missing (run scripts/fetch-qemu.sh)",
            qemu.display()
        ),
    )
}

/// A QEMU `-M microvm` command line for a PVH kernel such as the probe:
/// serial on stdout, the debug-exit device on port 0xf4 (exit status
/// `(code << 1) | 1`), no default devices, no reboot on a guest reset.
#[derive(Debug, Clone)]
pub struct Microvm {
    kernel: PathBuf,
    cmdline: String,
    memory_mib: u64,
    vcpus: u32,
    extra: Vec<String>,
    /// `-device` values of virtio devices, in slot order (see `VIRTIO_SLOTS`).
    virtio: Vec<String>,
}

/// QEMU microvm's virtio-mmio transports: 24 of 512 bytes from 0xfeb00000,
/// filled from the last one down (the first `-device` lands in slot 23).
const VIRTIO_SLOTS: u64 = 24;
const VIRTIO_MMIO_BASE: u64 = 0xfeb0_0000;
const VIRTIO_MMIO_SIZE: u64 = 512;
/// microvm's first virtio GSI with its second IOAPIC (ACPI on, the default).
const VIRTIO_IRQ_BASE: u64 = 24;

impl Microvm {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Microvm {
            kernel: kernel.into(),
            cmdline: String::new(),
            memory_mib: 64,
            vcpus: 1,
            extra: Vec::new(),
            virtio: Vec::new(),
        }
    }

    pub fn cmdline(mut self, cmdline: &str) -> Self {
        cmdline.clone_into(&mut self.cmdline);
        self
    }

    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self
    }

    /// More QEMU arguments (devices, `-device virtio-blk-device,...`).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// A virtio-mmio device (`virtio-rng-device`, `virtio-blk-device,drive=d0`),
    /// announced to the guest as `virtio_mmio.device=512@<base>:<irq>` on
    /// its command line: QEMU adds those only for Linux-style boots, not PVH.
    pub fn virtio_device(mut self, device: &str) -> Self {
        assert!(
            (self.virtio.len() as u64) < VIRTIO_SLOTS,
            "microvm has {VIRTIO_SLOTS} virtio-mmio slots"
        );
        self.virtio.push(device.to_owned());
        self
    }

    /// A raw image as a virtio-blk disk, read-only when `readonly`.
    pub fn virtio_disk(self, image: &Path, readonly: bool) -> Self {
        self.virtio_disk_as(image, "raw", readonly)
    }

    /// An image in QEMU's `format` (`raw`, `qcow2`, ...) as a virtio-blk disk.
    pub fn virtio_disk_as(self, image: &Path, format: &str, readonly: bool) -> Self {
        let id = format!("disk{}", self.virtio.len());
        let drive = format!(
            "if=none,id={id},format={format},file={}{}",
            image.display(),
            if readonly { ",readonly=on" } else { "" }
        );
        self.arg("-drive")
            .arg(drive)
            .virtio_device(&format!("virtio-blk-device,drive={id}"))
    }

    /// The guest command line with a `virtio_mmio.device=` entry per
    /// virtio device (Linux's format, which the probe reads too).
    pub fn full_cmdline(&self) -> String {
        let mut cmdline = self.cmdline.clone();
        for index in 0..self.virtio.len() as u64 {
            let slot = VIRTIO_SLOTS - 1 - index;
            cmdline.push_str(&format!(
                " virtio_mmio.device={VIRTIO_MMIO_SIZE}@{:#x}:{}",
                VIRTIO_MMIO_BASE + slot * VIRTIO_MMIO_SIZE,
                VIRTIO_IRQ_BASE + slot
            ));
        }
        cmdline
    }

    /// The arguments after the binary, for a benchmark to print or reuse.
    pub fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "-L",
            &self.firmware_dir_str(),
            // microvm's defaults fit the probe: qboot loads the PVH kernel,
            // ACPI (on) gives the MADT, the in-kernel PIT calibrates the TSC.
            "-M",
            "microvm",
            // `-cpu host` alone aborts on PVM hosts: KVM refuses the
            // IA32_ARCH_CAPABILITIES MSR (0x10a) QEMU sets for it.
            "-cpu",
            "host,-arch-capabilities",
            "-enable-kvm",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
        ]
        .map(str::to_owned)
        .into();
        args.extend([
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-smp".into(),
            self.vcpus.to_string(),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-append".into(),
            self.full_cmdline(),
            // Virtio 1.x (QEMU 7.2's virtio-mmio defaults to legacy 0.9).
            "-global".into(),
            "virtio-mmio.force-legacy=false".into(),
        ]);
        args.extend(self.extra.iter().cloned());
        for device in &self.virtio {
            args.extend(["-device".into(), device.clone()]);
        }
        args
    }

    fn firmware_dir_str(&self) -> String {
        qemu_firmware_dir().display().to_string()
    }

    pub fn command(&self) -> Command {
        let mut command = Command::new(qemu_binary());
        command.args(self.args());
        command
    }
}

/// How a VM process ended.
#[derive(Debug)]
pub struct VmRun {
    /// `None` when the process was killed at the timeout.
    pub status: Option<ExitStatus>,
    /// Everything the guest printed on the serial console (stdout).
    pub console: String,
    pub stderr: String,
    pub probe: ProbeOutput,
    /// Process start to exit.
    pub wall: Duration,
}

impl VmRun {
    pub fn exit_code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Everything about the run, for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "status {:?} after {:?}\n--- console ---\n{}\n--- stderr ---\n{}",
            self.status, self.wall, self.console, self.stderr
        )
    }
}

/// Runs a VM process (QEMU or oxvirt) to its end, killing it after
/// `timeout`; collects the console from stdout and parses the probe's lines.
pub fn run_vm(mut command: Command, timeout: Duration) -> VmRun {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let stdout = read_in_background(child.stdout.take().expect("piped stdout"));
    let stderr = read_in_background(child.stderr.take().expect("piped stderr"));
    let status = loop {
        match child.try_wait().expect("wait for the VM process") {
            Some(status) => break Some(status),
            None if start.elapsed() > timeout => {
                // The VM overran: kill it (and its threads) and report.
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    let wall = start.elapsed();
    let console = stdout.join().expect("stdout reader");
    VmRun {
        status,
        probe: ProbeOutput::parse(&console),
        console,
        stderr: stderr.join().expect("stderr reader"),
        wall,
    }
}

fn read_in_background(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// The probe guest ELF (`probe_binary()`), built first with
/// `cargo build --release -p oxvirt-probe` when it is missing, so a test
/// run on its own still boots the current guest. Panics, saying how to
/// build it, when that fails.
pub fn probe_kernel() -> PathBuf {
    let probe = probe_binary();
    if !probe.is_file() && std::env::var_os("OXVIRT_PROBE").is_none() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let built = Command::new(cargo)
            .args(["build", "--release", "-p", "oxvirt-probe"])
            .current_dir(workspace_root())
            .status();
        eprintln!("built the missing probe guest: {built:?}");
    }
    assert!(
        probe.is_file(),
        "probe guest {} is missing and could not be built: run \
         `cargo build --release -p oxvirt-probe` (scripts/test.sh does)",
        probe.display()
    );
    probe
}

/// The probe guest with its virtio workloads (`blk`, `rng`, `net`), built
/// with `cargo build --release -p oxvirt-probe --features virtio` into
/// `<target>/probe-virtio`: a separate build, because a whole-workspace
/// build cannot turn that feature on (see guest/probe/Cargo.toml).
/// `$OXVIRT_PROBE_VIRTIO` names a prebuilt one. Panics when the build fails.
pub fn probe_kernel_virtio() -> PathBuf {
    if let Some(path) = std::env::var_os("OXVIRT_PROBE_VIRTIO") {
        return PathBuf::from(path);
    }
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_probe_virtio).clone()
}

fn build_probe_virtio() -> PathBuf {
    let target = crate::paths::target_dir().join("probe-virtio");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "oxvirt-probe",
            "--features",
            "virtio",
        ])
        .arg("--target-dir")
        .arg(&target)
        .current_dir(workspace_root())
        .status();
    assert!(
        status.as_ref().is_ok_and(ExitStatus::success),
        "building the virtio probe failed ({status:?}): run `cargo build --release \
         -p oxvirt-probe --features virtio --target-dir {}`",
        target.display()
    );
    target.join("release/oxvirt-probe")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microvm_args_carry_the_probe_contract() {
        let args = Microvm::new("/k")
            .cmdline("probe=hello")
            .memory_mib(128)
            .vcpus(2)
            .arg("-S")
            .args();
        let joined = args.join(" ");
        assert!(joined.contains("-device isa-debug-exit,iobase=0xf4,iosize=4"));
        assert!(joined.contains("-M microvm"));
        assert!(joined.contains("-m 128M -smp 2 -kernel /k -append probe=hello"));
        assert_eq!(args.last().map(String::as_str), Some("-S"));
    }

    #[test]
    fn virtio_devices_are_announced_on_the_command_line() {
        let vm = Microvm::new("/k")
            .cmdline("probe=blk")
            .virtio_disk(Path::new("/d.raw"), true)
            .virtio_device("virtio-rng-device");
        assert_eq!(
            vm.full_cmdline(),
            "probe=blk virtio_mmio.device=512@0xfeb02e00:47 \
             virtio_mmio.device=512@0xfeb02c00:46"
        );
        let joined = vm.args().join(" ");
        assert!(joined.contains("-global virtio-mmio.force-legacy=false"));
        assert!(joined.contains(
            "-drive if=none,id=disk0,format=raw,file=/d.raw,readonly=on \
             -device virtio-blk-device,drive=disk0 -device virtio-rng-device"
        ));
    }
}
