//! The CPU-exception reporter. An exception in the ring-3 workload enters
//! ring 0 through the IDT (boot.rs) and lands here: it names the exception
//! and where it hit, then ends the run as a failure. Without it a bug would
//! be a silent triple fault (a reset, or a hang on some VMMs).

use super::console::line_unlocked;
use super::exit::{exit, ExitCode};
use crate::boot::ExceptionFrame;

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved",
];

/// Called by `exception_common` in ring 0 with the pushed frame.
pub extern "C" fn report(frame: &ExceptionFrame) -> ! {
    let name = NAMES
        .get(frame.vector as usize)
        .copied()
        .unwrap_or("unknown");
    let fault_addr = if frame.vector == 14 { read_cr2() } else { 0 };
    line_unlocked(format_args!(
        "PROBE DONE fail: CPU exception {} ({name}) error_code={:#x} rip={:#x} rsp={:#x} cs={:#x} rflags={:#x} cr2={fault_addr:#x}",
        frame.vector, frame.error_code, frame.rip, frame.rsp, frame.cs, frame.rflags
    ));
    exit(ExitCode::Fail)
}

fn read_cr2() -> u64 {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects; this runs in ring 0.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    cr2
}
