//! Shared by the `oxvirt vmm` integration tests: the binary, a tiny
//! assembled PVH guest for the exit paths the probe guest has no workload
//! for (power-off, i8042 reset, triple fault), and run helpers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use testkit::VmRun;

pub fn oxvirt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_oxvirt"))
}

/// `oxvirt vmm` with `args`, run to its end (killed after `timeout`).
pub fn vmm(args: &[&str], timeout: Duration) -> VmRun {
    let mut cmd = oxvirt();
    cmd.arg("vmm").args(args);
    testkit::run_vm(cmd, timeout)
}

/// The probe guest on oxvirt with `cmdline`, 64 MiB and `vcpus`.
pub fn probe(cmdline: &str, vcpus: u32) -> VmRun {
    let kernel = testkit::probe_kernel();
    let vcpus = vcpus.to_string();
    vmm(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--memory",
            "64M",
            "--vcpus",
            &vcpus,
        ],
        Duration::from_secs(60),
    )
}

/// A 32-bit PVH guest that acts on the first letter of its command line:
/// `p` ACPI power-off (S5 to port 0x600), `k` i8042 reset (0xfe to port
/// 0x64), `t` triple fault (#UD with an empty IDT), `dN` debug-exit N.
/// It prints `T` on COM1 first, and halts when the action returns.
const TINY_GUEST: &str = r#"
.section .note.Xen, "a", @note
  .long 4, 4, 18
  .asciz "Xen"
  .long _start
.text
.code32
.globl _start
_start:
  mov $0x3f8, %dx
  mov $'T', %al
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
  mov 24(%ebx), %esi      /* hvm_start_info.cmdline_paddr */
  movb (%esi), %al
  cmp $'p', %al
  je poweroff
  cmp $'k', %al
  je kbdreset
  cmp $'t', %al
  je triple
  cmp $'d', %al
  je debugexit
  jmp hang
poweroff:
  mov $0x34, %al
  mov $0x600, %dx
  out %al, %dx
  jmp hang
kbdreset:
  mov $0xfe, %al
  out %al, $0x64
  jmp hang
triple:
  lidt empty_idt
  ud2
debugexit:
  movzbl 1(%esi), %eax
  sub $'0', %eax
  out %eax, $0xf4
hang:
  hlt
  jmp hang
empty_idt:
  .word 0
  .long 0
"#;

/// Assembles and links the tiny guest once per test process.
pub fn tiny_guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let dir = testkit::target_dir().join(format!("vmm-tiny-guest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("tiny.S");
        std::fs::write(&src, TINY_GUEST).unwrap();
        let obj = dir.join("tiny.o");
        let elf = dir.join("tiny.elf");
        let ok = Command::new("as")
            .args(["--64", "-o"])
            .arg(&obj)
            .arg(&src)
            .status()
            .unwrap()
            .success()
            && Command::new("ld")
                .args(["-Ttext=0x100000", "-e", "_start", "-o"])
                .arg(&elf)
                .arg(&obj)
                .status()
                .unwrap()
                .success();
        assert!(
            ok,
            "assembling the tiny guest failed (binutils `as`/`ld` needed)"
        );
        elf
    })
}

/// A temporary folder for one test, removed by the caller at the end.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("oxvirt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
