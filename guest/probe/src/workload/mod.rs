//! The workloads, one module each, chosen by `probe=<name>`. Each declares
//! the `probe.<key>` parameters it knows; any other key is an error.

pub mod blk;
pub mod cpu;
pub mod fault;
pub mod hello;
pub mod mem;
pub mod net;
pub mod rng;
pub mod smp;

use crate::fail;
use crate::rt::fail::Fail;
use oxvirt_probe::bootinfo::BootInfo;
use oxvirt_probe::params::Params;

pub struct Workload {
    pub name: &'static str,
    pub keys: &'static [&'static str],
    pub run: fn(&BootInfo, &Params) -> Result<(), Fail>,
}

const WORKLOADS: &[Workload] = &[
    hello::WORKLOAD,
    cpu::WORKLOAD,
    smp::WORKLOAD,
    mem::WORKLOAD,
    fault::WORKLOAD,
    rng::WORKLOAD,
    blk::WORKLOAD,
    net::WORKLOAD,
];

pub fn run(boot: &BootInfo, params: &Params) -> Result<(), Fail> {
    let Some(workload) = WORKLOADS.iter().find(|w| w.name == params.workload) else {
        return fail!(
            "unknown workload probe={} (known: hello cpu smp mem fault rng blk net)",
            params.workload
        );
    };
    params.check_known(workload.keys)?;
    (workload.run)(boot, params)
}
