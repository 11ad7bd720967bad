//! `fault`: executes an invalid instruction in ring 3, to test that a CPU
//! exception ends the run with `PROBE DONE fail: CPU exception 6 ...` and
//! exit code 1 rather than a silent reset.

use super::Workload;
use crate::rt::fail::Fail;
use oxvirt_probe::{bootinfo::BootInfo, params::Params};

pub const WORKLOAD: Workload = Workload {
    name: "fault",
    keys: &[],
    run,
};

fn run(_boot: &BootInfo, _params: &Params) -> Result<(), Fail> {
    // SAFETY: ud2 raises #UD, which the IDT reports; control never returns here.
    unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
    Ok(())
}
