//! oxvirt-probe: a freestanding guest for VMM tests and benchmarks.
//!
//! It boots through PVH (`boot`), drops to ring 3 with IOPL=3 and interrupts
//! off, reads its job from the kernel command line and runs one workload,
//! talking over the serial console and ending through the debug-exit port.
//! See docs/probe.md for the protocol.

#![no_std]
#![no_main]
// `Fail` carries its message inline (there is no heap to box it in); a
// failure ends the run, so the larger Result costs nothing that matters.
#![allow(clippy::result_large_err)]

mod boot;
mod rt;
mod workload;

use oxvirt_probe::bootinfo::BootInfo;
use oxvirt_probe::params::Params;
use rt::exit::{exit, ExitCode};
use rt::fail::Fail;
use rt::physmem::IdentityMap;

/// Every CPU arrives here in ring 3 (from `ring3_start` in boot.rs).
pub extern "C" fn ring3_entry(cpu: u64) -> ! {
    if cpu == 0 {
        bsp_main()
    } else {
        workload::smp::ap_main(cpu as usize)
    }
}

fn bsp_main() -> ! {
    boot::install_exception_handlers();
    rt::console::init();
    say!("PROBE READY");
    match run() {
        Ok(()) => {
            say!("PROBE DONE ok");
            exit(ExitCode::Ok)
        }
        Err(fail) => {
            say!("PROBE DONE fail: {}", fail.as_str());
            exit(ExitCode::Fail)
        }
    }
}

fn run() -> Result<(), Fail> {
    let boot = BootInfo::read(&IdentityMap, boot::start_info_paddr())?;
    let params = Params::parse(boot.cmdline()?)?;
    workload::run(&boot, &params)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let (file, line) = info.location().map_or(("?", 0), |l| (l.file(), l.line()));
    rt::console::line_unlocked(format_args!(
        "PROBE DONE fail: panic at {file}:{line}: {}",
        info.message()
    ));
    exit(ExitCode::Fail)
}
