//! The peer VMM: Debian's QEMU 7.2, unpacked privately under `.peer/qemu`
//! by `scripts/fetch-qemu.sh`, run as `-M microvm` on the same probe guest
//! the oxvirt VMM runs. Also the one way tests run any VM process to its end
//! (`run_vm`), so QEMU and oxvirt runs are timed and parsed alike.

use std::io::Read;
use std::path::PathBuf;
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
}

impl Microvm {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Microvm {
            kernel: kernel.into(),
            cmdline: String::new(),
            memory_mib: 64,
            vcpus: 1,
            extra: Vec::new(),
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
            self.cmdline.clone(),
        ]);
        args.extend(self.extra.iter().cloned());
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
}
