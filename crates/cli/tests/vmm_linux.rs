//! Linux early boot on `oxvirt vmm`: the Debian cloud kernel (fetched by
//! scripts/fetch-kernel.sh) through PVH, checked on the serial console up to
//! where this machine's emulated ring 0 lets it go (see docs/vmm.md). A
//! boot takes tens of seconds here, so there is one. (The bzImage path's
//! decompressor runs entirely in emulated ring 0 here and prints nothing
//! within minutes; see docs/vmm.md.)

mod vmm_common;

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_common::oxvirt;

fn kernel(name: &str) -> Option<PathBuf> {
    let path = testkit::peer_dir().join("kernel").join(name);
    testkit::require(
        path.is_file(),
        &format!(
            "{} is missing (run scripts/fetch-kernel.sh)",
            path.display()
        ),
    )
    .then_some(path)
}

/// Boots `kernel` and returns the console once every needle appeared (or
/// panics with the console after `timeout`); the VM is killed either way.
fn boot_until(
    kernel: &PathBuf,
    extra: &[&str],
    cmdline: &str,
    needles: &[&str],
    timeout: Duration,
) -> String {
    let mut child = oxvirt()
        .arg("vmm")
        .arg("--kernel")
        .arg(kernel)
        .args(["--memory", "256M", "--cmdline", cmdline])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start oxvirt vmm");
    let console = Arc::new(Mutex::new(String::new()));
    let mut stdout = child.stdout.take().unwrap();
    let sink = console.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let start = Instant::now();
    let done = loop {
        let text = console.lock().unwrap().clone();
        if needles.iter().all(|n| text.contains(n)) {
            break Ok(text);
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            break Err(format!(
                "VMM exited with {status}: {stderr}\n--- console ---\n{text}"
            ));
        }
        if start.elapsed() > timeout {
            break Err(format!(
                "no {needles:?} within {timeout:?}\n--- console ---\n{text}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    done.unwrap_or_else(|e| panic!("{e}"))
}

// `noxsave` as in the QEMU run this is compared with (docs/vmm.md).
const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 noxsave oxvirt.test=1";

fn assert_early_boot(console: &str) {
    assert!(console.contains("Linux version 6."), "{console}");
    // Exactly our command line: the whole console line, before its \r\n.
    let ours = format!("Command line: {CMDLINE}");
    assert!(
        console.lines().any(|l| l.trim_end().ends_with(&ours)),
        "{console}"
    );
    // Our e820 map: low RAM up to the EBDA, RAM from 1 MiB to 256 MiB.
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        "{console}"
    );
    assert!(
        console.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"),
        "{console}"
    );
}

// Reaching QEMU's furthest line here (`x86/fpu: x87 FPU will use FXSAVE`)
// under pvm-compat is not yet achieved; see docs/vmm.md.
#[test]
fn heavy_linux_pvh_early_boot_shows_our_cmdline_e820_and_madt() {
    if !testkit::require_kvm() {
        return;
    }
    let Some(vmlinux) = kernel("vmlinux") else {
        return;
    };
    let console = boot_until(
        &vmlinux,
        &["--cpu-profile", "pvm-compat", "--vcpus", "2"],
        CMDLINE,
        &["ACPI: APIC 0x"],
        Duration::from_secs(200),
    );
    assert_early_boot(&console);
}
