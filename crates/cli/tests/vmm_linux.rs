//! Linux early boot on `oxvirt vmm`: the Debian cloud kernel (fetched by
//! scripts/fetch-kernel.sh) through PVH and as a bzImage, checked on the
//! serial console up to where this machine's emulated ring 0 lets it go
//! (see docs/vmm.md). Every boot here runs the kernel's ring-0 code in
//! KVM's instruction emulator, so each test takes from tens of seconds
//! (PVH) to minutes (bzImage: the decompressor alone is ~106 s of vCPU time);
//! the timeouts allow for a loaded machine.

mod vmm_common;

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_common::oxvirt;

/// The busybox initramfs of scripts/fetch-initramfs.sh.
fn initramfs() -> Option<PathBuf> {
    let path = testkit::peer_dir().join("initramfs/initramfs.cpio.gz");
    testkit::require(
        path.is_file(),
        &format!(
            "{} is missing (run scripts/fetch-initramfs.sh)",
            path.display()
        ),
    )
    .then_some(path)
}

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
        .args(["--cmdline", cmdline])
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

/// The kernel's `RAMDISK: [mem START-END]` line (setup_arch) covers the
/// initrd we loaded, page-aligned: it found our PVH module entry.
fn assert_ramdisk(console: &str, initrd: &std::path::Path) {
    let line = (console.lines())
        .find_map(|l| l.split_once("RAMDISK: [mem ").map(|(_, r)| r.to_owned()))
        .unwrap_or_else(|| panic!("no RAMDISK line in\n{console}"));
    let (start, end) = line
        .trim_end()
        .trim_end_matches(']')
        .split_once('-')
        .unwrap();
    let parse = |v: &str| u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap();
    let size = std::fs::metadata(initrd).unwrap().len();
    assert_eq!(start.len(), 10, "{line}");
    assert_eq!(parse(start) % 4096, 0, "{line}");
    assert_eq!(
        parse(end) + 1 - parse(start),
        size.div_ceil(4096) * 4096,
        "{line}"
    );
}

/// The initramfs is a newc archive GNU cpio lists with /init (executable,
/// valid shell for busybox), busybox and the console device the kernel
/// opens for init; busybox is static (the archive has no libraries).
#[test]
fn initramfs_holds_init_busybox_and_the_console() {
    let Some(initrd) = initramfs() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("oxvirt-initramfs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = format!(
        "gzip -dc {0} | cpio -tv --quiet && cd {1} && gzip -dc {0} | cpio -id --quiet",
        initrd.display(),
        dir.display()
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8(out.stdout).unwrap();
    let entry = |name: &str| {
        (listing.lines())
            .find(|l| l.split_whitespace().last() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in\n{listing}"))
    };
    assert!(entry("init").starts_with("-rwxr-xr-x"), "{listing}");
    assert!(entry("bin/busybox").starts_with("-rwxr-xr-x"), "{listing}");
    let console = entry("dev/console");
    assert!(
        console.starts_with("crw") && console.contains("5,   1"),
        "{listing}"
    );
    for d in ["proc", "sys", "dev", "bin"] {
        assert!(entry(d).starts_with('d'), "{listing}");
    }
    let init = std::fs::read_to_string(dir.join("init")).unwrap();
    assert!(init.starts_with("#!/bin/busybox sh\n"), "{init}");
    let busybox = dir.join("bin/busybox");
    let check = std::process::Command::new(&busybox)
        .args(["sh", "-n"])
        .arg(dir.join("init"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let elf = std::fs::read(&busybox).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    let interp = std::process::Command::new("readelf")
        .arg("-lW")
        .arg(&busybox)
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&interp.stdout).contains("INTERP"),
        "busybox is dynamic"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

const CMDLINE: &str = "console=ttyS0 earlyprintk=ttyS0 oxvirt.test=1";

/// Checks the kernel's banner, that it got exactly `cmdline` (the whole
/// console line, before its \r\n) and our e820 map for `mem_end` bytes.
fn assert_early_boot(console: &str, cmdline: &str, mem_end: u64) {
    assert!(console.contains("Linux version 6."), "{console}");
    let ours = format!("Command line: {cmdline}");
    assert!(
        console.lines().any(|l| l.trim_end().ends_with(&ours)),
        "{console}"
    );
    // Low RAM up to the EBDA, the reserved BIOS area (from 0xe0000 as we
    // give it, or 0xa0000 where Linux's PVH code adds the ISA hole), RAM
    // from 1 MiB.
    for range in [
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".to_owned(),
        "-0x00000000000fffff] reserved".to_owned(),
        format!(
            "BIOS-e820: [mem 0x0000000000100000-{:#018x}] usable",
            mem_end - 1
        ),
    ] {
        assert!(console.contains(&range), "no {range:?} in\n{console}");
    }
}

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
        &[
            "--memory",
            "256M",
            "--cpu-profile",
            "pvm-compat",
            "--vcpus",
            "2",
        ],
        CMDLINE,
        &["ACPI: APIC 0x"],
        Duration::from_secs(400),
    );
    assert_early_boot(&console, CMDLINE, 256 << 20);
}

/// Under pvm-compat the kernel must not use XSAVE (the emulator cannot run
/// it) without being told `noxsave`, and so reach the line QEMU reaches
/// here: `x86/fpu: x87 FPU will use FXSAVE` (about 85 s of vCPU time).
#[test]
fn heavy_linux_pvm_compat_drops_xsave_and_uses_fxsave() {
    if !testkit::require_kvm() {
        return;
    }
    let Some(vmlinux) = kernel("vmlinux") else {
        return;
    };
    let Some(initrd) = initramfs() else {
        return;
    };
    let console = boot_until(
        &vmlinux,
        &[
            "--memory",
            "128M",
            "--cpu-profile",
            "pvm-compat",
            "--vcpus",
            "2",
            "--initrd",
            initrd.to_str().unwrap(),
        ],
        CMDLINE,
        &["x86/fpu: x87 FPU will use FXSAVE"],
        Duration::from_secs(900),
    );
    assert_early_boot(&console, CMDLINE, 128 << 20);
    assert_ramdisk(&console, &initrd);
    for line in [
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
        "CPU: CPU feature xsave disabled, no CPUID level 0xd",
    ] {
        assert!(console.contains(line), "no {line:?} in\n{console}");
    }
    assert!(!console.contains("XSAVE feature"), "{console}");
}

/// The bzImage through the 64-bit boot protocol: the kernel's own
/// decompressor runs first, all of it in emulated ring 0 here (about 105 s
/// of vCPU time), then the kernel prints what the PVH boot prints.
/// `nokaslr` spares the decompressor the relocation pass.
#[test]
fn heavy_linux_bzimage_early_boot_shows_our_cmdline_and_e820() {
    if !testkit::require_kvm() {
        return;
    }
    let Some(vmlinuz) = kernel("vmlinuz") else {
        return;
    };
    let cmdline = "console=ttyS0 earlyprintk=ttyS0 nokaslr oxvirt.test=bzimage";
    let console = boot_until(
        &vmlinuz,
        &["--memory", "128M", "--cpu-profile", "pvm-compat"],
        cmdline,
        &["BIOS-e820: [mem 0x0000000000100000-"],
        Duration::from_secs(900),
    );
    assert_early_boot(&console, cmdline, 128 << 20);
}
