//! One cgroup per domain, with a child group per vCPU and one for the VMM's
//! other threads (`emulator`), as libvirt lays them out, on cgroup v1, v2 or
//! a hybrid host.
//!
//! ```text
//! <caller's cgroup or root>/<parent>/<domain>/          memory, blkio/io, pids, cpu
//!                                   <domain>/emulator/  cpu, cpuacct, cpuset
//!                                   <domain>/vcpu0/     cpu, cpuacct, cpuset
//! ```
//!
//! On v1 every controller hierarchy gets the domain folder and the cpu ones
//! the children; on v2 the children are threaded cgroups, which is how one
//! process's threads can sit in different groups.

mod convert;
mod cpulist;
mod domain;
mod files;
mod layout;
mod limits;

use std::path::PathBuf;

pub use convert::{
    blkio_weight_to_io_weight, io_weight_to_blkio_weight, memory_plus_swap, shares_to_weight,
    weight_to_shares,
};
pub use cpulist::{CpuList, CpuListError};
pub use domain::{DomainCgroup, ParentGroup, Scope};
pub use layout::{CgroupVersion, Layout, V1Mount, V2Mount};
pub use limits::{CpuLimits, DeviceNumber, IoLimits, MemoryLimits, Stats, Throttle, ThrottleKind};

/// The controllers oxvirt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Controller {
    Cpu,
    Cpuacct,
    Cpuset,
    Memory,
    /// `blkio` on v1, `io` on v2.
    Io,
    Pids,
}

impl Controller {
    pub const ALL: [Controller; 6] = [
        Controller::Cpu,
        Controller::Cpuacct,
        Controller::Cpuset,
        Controller::Memory,
        Controller::Io,
        Controller::Pids,
    ];

    pub fn v1_name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Cpuacct => "cpuacct",
            Controller::Cpuset => "cpuset",
            Controller::Memory => "memory",
            Controller::Io => "blkio",
            Controller::Pids => "pids",
        }
    }

    /// The v2 name; cpuacct has none (v2's `cpu.stat` is always there).
    pub fn v2_name(self) -> Option<&'static str> {
        match self {
            Controller::Cpuacct => None,
            Controller::Io => Some("io"),
            other => Some(other.v1_name()),
        }
    }

    fn from_v1(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.v1_name() == name)
    }

    /// Controllers that live in the per-thread child groups.
    fn per_thread(self) -> bool {
        matches!(
            self,
            Controller::Cpu | Controller::Cpuacct | Controller::Cpuset
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup hierarchy is mounted (no cgroup or cgroup2 entry in /proc/self/mountinfo)")]
    NoHierarchy,
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("creating cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("removing cgroup {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup {path} already exists (open it, or destroy the leftover first)")]
    Exists { path: PathBuf },
    #[error("cgroup {path} is missing")]
    Missing { path: PathBuf },
    #[error("cgroup {path} still holds tasks {tasks:?}; kill or move them before removing it")]
    NotEmpty { path: PathBuf, tasks: Vec<u32> },
    #[error(
        "cannot enable controllers below cgroup {path}: it holds processes itself \
         (cgroup v2's no-internal-process rule); put the domains' parent elsewhere"
    )]
    InternalProcesses { path: PathBuf },
    #[error("parsing {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("domain {domain}: the {controller:?} controller is not available on this host")]
    ControllerMissing {
        domain: String,
        controller: Controller,
    },
    #[error("domain {domain}: {setting} is not supported here ({detail})")]
    Unsupported {
        domain: String,
        setting: &'static str,
        detail: String,
    },
    #[error("invalid {setting} {value}: {reason}")]
    InvalidValue {
        setting: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid domain name {name:?} for a cgroup: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("domain {domain} has {vcpus} vCPUs; there is no vCPU {index}")]
    NoSuchVcpu {
        domain: String,
        index: u32,
        vcpus: u32,
    },
    #[error("sending SIGKILL to task {tid} in {path}: {source}")]
    Kill {
        path: PathBuf,
        tid: u32,
        source: nix::Error,
    },
}
