//! A definition's resource settings applied to a domain's cgroups, at start
//! and live (schedinfo, memtune, vcpupin).

use std::path::Path;

use host::cgroup::{
    CgroupError, CpuList, DeviceNumber, DomainCgroup, MemoryLimits, Scope, ThrottleKind,
};
pub use host::size::parse_bytes;
use host::size::{self, CpuQuota, MemorySwap, SizeError};
use serde::{Deserialize, Serialize};

use crate::config::{DomainDef, Resources};

/// Errors applying limits.
#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{field}: {source}")]
    Size {
        field: &'static str,
        source: SizeError,
    },
    #[error("{field}: {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
}

impl TuneError {
    pub fn field(&self) -> Option<&'static str> {
        match self {
            TuneError::Size { field, .. } | TuneError::Invalid { field, .. } => Some(field),
            TuneError::Cgroup(_) => None,
        }
    }
}

/// The CFS period the kernel uses when none is set.
pub const DEFAULT_PERIOD_US: u64 = 100_000;

/// Applies the domain-wide limits (before the VMM runs guest code).
pub fn apply_domain(cg: &DomainCgroup, r: &Resources) -> Result<(), TuneError> {
    if let Some(shares) = r.cpu_shares {
        cg.set_cpu_shares(Scope::Domain, shares)?;
    }
    if let Some(cpus) = r.cpus {
        let quota = size::parse_cpus(&cpus.to_string()).map_err(|source| TuneError::Size {
            field: "resources.cpus",
            source,
        })?;
        cg.set_cpu_quota(Scope::Domain, Some(quota))?;
    }
    if let Some(list) = &r.cpuset_cpus {
        cg.set_cpuset_cpus(Scope::Domain, &cpu_list("resources.cpuset_cpus", list)?)?;
    }
    if let Some(list) = &r.cpuset_mems {
        cg.set_cpuset_mems(Scope::Domain, &cpu_list("resources.cpuset_mems", list)?)?;
    }
    if r.memory_limit.is_some() || r.memory_soft_limit.is_some() || r.memory_swap.is_some() {
        cg.set_memory(&MemoryLimits {
            limit: r.memory_limit.map(|l| l.0),
            soft: r.memory_soft_limit.map(|l| l.0),
            swap: r.memory_swap.map_or(MemorySwap::Unset, |s| s.0),
        })?;
    }
    if let Some(pids) = r.pids_limit {
        cg.set_pids_limit(Some(pids))?;
    }
    apply_blkio_live(cg, r)
}

/// Applies the block I/O weight and host-device throttles of `r`.
pub fn apply_blkio_live(cg: &DomainCgroup, r: &Resources) -> Result<(), TuneError> {
    if let Some(weight) = r.blkio_weight {
        cg.set_blkio_weight(weight)?;
    }
    apply_throttles(cg, r)
}

fn apply_throttles(cg: &DomainCgroup, r: &Resources) -> Result<(), TuneError> {
    let groups = [
        (
            "resources.device_read_bps",
            &r.device_read_bps,
            ThrottleKind::ReadBps,
        ),
        (
            "resources.device_write_bps",
            &r.device_write_bps,
            ThrottleKind::WriteBps,
        ),
        (
            "resources.device_read_iops",
            &r.device_read_iops,
            ThrottleKind::ReadIops,
        ),
        (
            "resources.device_write_iops",
            &r.device_write_iops,
            ThrottleKind::WriteIops,
        ),
    ];
    for (field, specs, kind) in groups {
        for spec in specs {
            let parsed = match kind {
                ThrottleKind::ReadBps | ThrottleKind::WriteBps => size::parse_device_bps(spec),
                ThrottleKind::ReadIops | ThrottleKind::WriteIops => size::parse_device_iops(spec),
            }
            .map_err(|source| TuneError::Size { field, source })?;
            let device = DeviceNumber::of_block_device(Path::new(&parsed.device))?;
            cg.set_throttle(device, kind, Some(parsed.rate))?;
        }
    }
    Ok(())
}

/// Applies the per-vCPU settings once the vCPU threads sit in their groups.
pub fn apply_vcpus(cg: &DomainCgroup, def: &DomainDef) -> Result<(), TuneError> {
    let r = &def.resources;
    if let Some(quota) = vcpu_quota(r.vcpu_quota, r.vcpu_period) {
        for vcpu in 0..def.vcpus {
            cg.set_cpu_quota(Scope::Vcpu(vcpu), Some(quota))?;
        }
    }
    for (key, list) in &r.vcpupin {
        let vcpu = key.parse::<u32>().map_err(|_| TuneError::Invalid {
            field: "resources.vcpupin",
            value: key.clone(),
            reason: "not a vCPU number".into(),
        })?;
        cg.set_cpuset_cpus(Scope::Vcpu(vcpu), &cpu_list("resources.vcpupin", list)?)?;
    }
    Ok(())
}

/// The real-time budget (µs per second) a domain's vCPUs share where the
/// kernel schedules real-time tasks per cgroup.
pub const REALTIME_BUDGET_US: u64 = 500_000;

/// Makes the vCPU threads real-time as `vcpu_sched` says (libvirt's
/// vcpusched, `--cap-add sys_nice`).
pub fn apply_vcpu_sched(
    cg: Option<&DomainCgroup>,
    def: &DomainDef,
    vcpu_tids: &[u32],
) -> Result<(), TuneError> {
    let Some(text) = &def.resources.vcpu_sched else {
        return Ok(());
    };
    let (policy, priority) =
        crate::config::parse_vcpu_sched(text).map_err(|reason| TuneError::Invalid {
            field: "resources.vcpu_sched",
            value: text.clone(),
            reason,
        })?;
    if let Some(cg) = cg {
        cg.grant_realtime(REALTIME_BUDGET_US)?;
    }
    let policy = match policy {
        crate::config::RtPolicy::Fifo => libc::SCHED_FIFO,
        crate::config::RtPolicy::RoundRobin => libc::SCHED_RR,
    };
    for &tid in vcpu_tids {
        let param = libc::sched_param {
            sched_priority: i32::from(priority),
        };
        // SAFETY: sched_setscheduler reads the sched_param we pass, which
        // lives across the call; `tid` names a thread of our VMM.
        let rc = unsafe { libc::sched_setscheduler(tid as libc::pid_t, policy, &param) };
        if rc != 0 {
            return Err(TuneError::Invalid {
                field: "resources.vcpu_sched",
                value: text.clone(),
                reason: format!(
                    "vCPU thread {tid}: sched_setscheduler: {}",
                    std::io::Error::last_os_error()
                ),
            });
        }
    }
    Ok(())
}

fn vcpu_quota(quota: Option<u64>, period: Option<u64>) -> Option<CpuQuota> {
    quota.map(|quota_us| CpuQuota {
        quota_us,
        period_us: period.unwrap_or(DEFAULT_PERIOD_US),
    })
}

fn cpu_list(field: &'static str, text: &str) -> Result<CpuList, TuneError> {
    text.parse()
        .map_err(|e: host::cgroup::CpuListError| TuneError::Invalid {
            field,
            value: text.to_owned(),
            reason: e.to_string(),
        })
}

/// virsh schedinfo's parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_shares: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_period: Option<u64>,
    /// Microseconds per period; -1 lifts the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_quota: Option<i64>,
}

/// The schedinfo a live domain has in its cgroups.
pub fn read_schedinfo(cg: &DomainCgroup) -> Result<SchedInfo, TuneError> {
    let domain = cg.cpu_limits(Scope::Domain)?;
    let vcpu = cg.cpu_limits(Scope::Vcpu(0))?;
    Ok(SchedInfo {
        cpu_shares: Some(domain.shares),
        vcpu_period: Some(vcpu.period_us),
        vcpu_quota: Some(vcpu.quota_us.map_or(-1, |q| q as i64)),
    })
}

/// The schedinfo a definition asks for.
pub fn config_schedinfo(r: &Resources) -> SchedInfo {
    SchedInfo {
        cpu_shares: r.cpu_shares,
        vcpu_period: r.vcpu_period,
        vcpu_quota: Some(r.vcpu_quota.map_or(-1, |q| q as i64)),
    }
}

/// Writes a schedinfo change into a definition's resources.
pub fn merge_schedinfo(r: &mut Resources, change: &SchedInfo) -> Result<(), TuneError> {
    if let Some(shares) = change.cpu_shares {
        r.cpu_shares = Some(shares);
    }
    if let Some(period) = change.vcpu_period {
        r.vcpu_period = Some(period);
    }
    match change.vcpu_quota {
        Some(-1) => r.vcpu_quota = None,
        Some(q) if q >= 1_000 => r.vcpu_quota = Some(q as u64),
        Some(q) => {
            return Err(TuneError::Invalid {
                field: "vcpu_quota",
                value: q.to_string(),
                reason: "must be at least 1000 us, or -1 for no limit".into(),
            })
        }
        None => {}
    }
    Ok(())
}

/// Applies the CPU settings of `r` to a live domain.
pub fn apply_sched_live(cg: &DomainCgroup, vcpus: u32, r: &Resources) -> Result<(), TuneError> {
    if let Some(shares) = r.cpu_shares {
        cg.set_cpu_shares(Scope::Domain, shares)?;
    }
    let quota = vcpu_quota(r.vcpu_quota, r.vcpu_period);
    for vcpu in 0..vcpus {
        cg.set_cpu_quota(Scope::Vcpu(vcpu), quota)?;
    }
    Ok(())
}

/// virsh memtune's parameters, in bytes; -1 lifts a limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemTune {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_limit: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft_limit: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swap_hard_limit: Option<i64>,
}

fn to_signed(v: Option<u64>) -> Option<i64> {
    Some(v.map_or(-1, |v| v.min(i64::MAX as u64) as i64))
}

/// The memory limits a live domain has.
pub fn read_memtune(cg: &DomainCgroup) -> Result<MemTune, TuneError> {
    let m = cg.memory_limits()?;
    Ok(MemTune {
        hard_limit: to_signed(m.limit),
        soft_limit: to_signed(m.soft),
        swap_hard_limit: match m.swap {
            MemorySwap::Limit(n) => Some(n as i64),
            MemorySwap::Unlimited | MemorySwap::Unset => Some(-1),
        },
    })
}

/// The memory limits a definition asks for.
pub fn config_memtune(r: &Resources) -> MemTune {
    MemTune {
        hard_limit: to_signed(r.memory_limit.map(|l| l.0)),
        soft_limit: to_signed(r.memory_soft_limit.map(|l| l.0)),
        swap_hard_limit: match r.memory_swap.map(|s| s.0) {
            Some(MemorySwap::Limit(n)) => Some(n as i64),
            _ => Some(-1),
        },
    }
}

/// Writes a memtune change into a definition's resources.
pub fn merge_memtune(r: &mut Resources, change: &MemTune) -> Result<(), TuneError> {
    use crate::config::{ByteSize, SwapSetting};
    let size = |field: &'static str, v: i64| -> Result<Option<ByteSize>, TuneError> {
        match v {
            -1 => Ok(None),
            v if v > 0 => Ok(Some(ByteSize(v as u64))),
            v => Err(TuneError::Invalid {
                field,
                value: v.to_string(),
                reason: "must be a positive size, or -1 for no limit".into(),
            }),
        }
    };
    if let Some(v) = change.hard_limit {
        r.memory_limit = size("hard_limit", v)?;
    }
    if let Some(v) = change.soft_limit {
        r.memory_soft_limit = size("soft_limit", v)?;
    }
    if let Some(v) = change.swap_hard_limit {
        r.memory_swap = Some(SwapSetting(match size("swap_hard_limit", v)? {
            Some(s) => MemorySwap::Limit(s.0),
            None => MemorySwap::Unlimited,
        }));
    }
    Ok(())
}

/// Applies the memory settings of `r` to a live domain.
pub fn apply_memory_live(cg: &DomainCgroup, r: &Resources) -> Result<(), TuneError> {
    cg.set_memory(&MemoryLimits {
        limit: r.memory_limit.map(|l| l.0),
        soft: r.memory_soft_limit.map(|l| l.0),
        swap: r.memory_swap.map_or(MemorySwap::Unset, |s| s.0),
    })?;
    Ok(())
}

/// The CPUs each vCPU may run on, live.
pub fn read_vcpupin(cg: &DomainCgroup, vcpus: u32) -> Result<Vec<String>, TuneError> {
    (0..vcpus)
        .map(|v| Ok(cg.cpu_limits(Scope::Vcpu(v))?.cpus.to_string()))
        .collect()
}

/// Pins one vCPU live.
pub fn pin_live(cg: &DomainCgroup, vcpu: u32, cpus: &str) -> Result<(), TuneError> {
    cg.set_cpuset_cpus(Scope::Vcpu(vcpu), &cpu_list("cpulist", cpus)?)?;
    Ok(())
}
