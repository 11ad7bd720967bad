//! The workloads, one module each, chosen by `probe=<name>`. Each declares
//! the `probe.<key>` parameters it knows; any other key is an error.

#[cfg(feature = "virtio")]
pub mod blk;
pub mod cpu;
pub mod fault;
pub mod hello;
pub mod mem;
#[cfg(feature = "virtio")]
pub mod net;
#[cfg(feature = "virtio")]
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
];

/// The virtio workloads, in a probe built with `--features virtio`.
#[cfg(feature = "virtio")]
const VIRTIO_WORKLOADS: &[Workload] = &[rng::WORKLOAD, blk::WORKLOAD, net::WORKLOAD];
#[cfg(not(feature = "virtio"))]
const VIRTIO_WORKLOADS: &[Workload] = &[];

pub fn run(boot: &BootInfo, params: &Params) -> Result<(), Fail> {
    let mut all = WORKLOADS.iter().chain(VIRTIO_WORKLOADS);
    let Some(workload) = all.find(|w| w.name == params.workload) else {
        let virtio = if VIRTIO_WORKLOADS.is_empty() {
            "; rng blk net need a probe built with --features virtio"
        } else {
            " rng blk net"
        };
        return fail!(
            "unknown workload probe={} (known: hello cpu smp mem fault{virtio})",
            params.workload
        );
    };
    params.check_known(workload.keys)?;
    (workload.run)(boot, params)
}
