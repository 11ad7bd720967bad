//! `hello`: boot, report what the VMM handed over, exit. The smallest run,
//! used to time a VMM from process start to guest exit.

use super::Workload;
use crate::rt::{fail::Fail, lapic::Lapic};
use crate::say;
use oxvirt_probe::{bootinfo::BootInfo, params::Params};

pub const WORKLOAD: Workload = Workload {
    name: "hello",
    keys: &[],
    run,
};

fn run(boot: &BootInfo, _params: &Params) -> Result<(), Fail> {
    say!(
        "PROBE RESULT hello cpu={} ram_mib={} regions={} rsdp={:#x}",
        Lapic::default().id(),
        boot.ram_below_4g() >> 20,
        boot.regions().len(),
        boot.rsdp_paddr
    );
    Ok(())
}
