//! Setting and reading a domain's limits and statistics, in v1 or v2 files.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::size::{CpuQuota, MemorySwap};

use super::convert::{
    blkio_weight_to_io_weight, io_weight_to_blkio_weight, memory_plus_swap, shares_to_weight,
    weight_to_shares, MAX_BLKIO_WEIGHT, MAX_SHARES, MIN_BLKIO_WEIGHT, MIN_MEMORY, MIN_SHARES,
};
use super::files::{parse_error, parse_limit, read, read_keyed, read_limit, read_u64, write};
use super::{CgroupError, Controller, CpuList, DomainCgroup, Scope};

const MIN_PERIOD_US: u64 = 1_000;
const MAX_PERIOD_US: u64 = 1_000_000;

/// CPU settings of one scope, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuLimits {
    /// v1 `cpu.shares`; on v2 converted back from `cpu.weight`.
    pub shares: u64,
    /// `None` when the scope may use whole CPUs.
    pub quota_us: Option<u64>,
    pub period_us: u64,
    /// The CPUs and memory nodes the scope may use.
    pub cpus: CpuList,
    pub mems: CpuList,
}

/// Memory limits of a domain (what `memtune` and Docker's flags set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryLimits {
    /// Hard limit in bytes (`None`: unlimited).
    pub limit: Option<u64>,
    /// Soft limit (v1 `memory.soft_limit_in_bytes`, v2 `memory.low`).
    pub soft: Option<u64>,
    /// Memory plus swap, with Docker's rules for unset and `-1`.
    pub swap: MemorySwap,
}

/// A block device's `major:minor` number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceNumber {
    pub major: u32,
    pub minor: u32,
}

/// Which per-device throttle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThrottleKind {
    ReadBps,
    WriteBps,
    ReadIops,
    WriteIops,
}

/// One per-device throttle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Throttle {
    pub device: DeviceNumber,
    pub kind: ThrottleKind,
    /// Bytes or operations per second.
    pub limit: u64,
}

/// Block I/O settings, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoLimits {
    /// v1 `blkio.weight` scale (10..1000); `None` where the kernel has no
    /// proportional-weight I/O scheduler.
    pub weight: Option<u64>,
    pub throttles: Vec<Throttle>,
}

/// A domain's usage counters. Fields are `None` where the host lacks the
/// controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_ns: u64,
    pub memory_usage: Option<u64>,
    /// How often the kernel's OOM killer killed a task of the domain.
    pub oom_kills: Option<u64>,
    pub pids: Option<u64>,
}

impl DeviceNumber {
    /// The device number of a block device node such as `/dev/vda`.
    pub fn of_block_device(path: &Path) -> Result<Self, CgroupError> {
        let invalid = |reason: String| CgroupError::InvalidValue {
            setting: "block device",
            value: path.display().to_string(),
            reason,
        };
        let st = nix::sys::stat::stat(path).map_err(|e| invalid(e.desc().to_owned()))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFBLK {
            return Err(invalid("not a block device".to_owned()));
        }
        Ok(DeviceNumber {
            major: libc::major(st.st_rdev),
            minor: libc::minor(st.st_rdev),
        })
    }
}

impl fmt::Display for DeviceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl FromStr for DeviceNumber {
    type Err = CgroupError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed = s
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
        match parsed {
            Some((major, minor)) => Ok(DeviceNumber { major, minor }),
            None => Err(CgroupError::InvalidValue {
                setting: "device number",
                value: s.to_owned(),
                reason: "expected MAJOR:MINOR".to_owned(),
            }),
        }
    }
}

impl ThrottleKind {
    pub const ALL: [ThrottleKind; 4] = [
        ThrottleKind::ReadBps,
        ThrottleKind::WriteBps,
        ThrottleKind::ReadIops,
        ThrottleKind::WriteIops,
    ];

    fn v1_file(self) -> &'static str {
        match self {
            ThrottleKind::ReadBps => "blkio.throttle.read_bps_device",
            ThrottleKind::WriteBps => "blkio.throttle.write_bps_device",
            ThrottleKind::ReadIops => "blkio.throttle.read_iops_device",
            ThrottleKind::WriteIops => "blkio.throttle.write_iops_device",
        }
    }

    fn v2_key(self) -> &'static str {
        match self {
            ThrottleKind::ReadBps => "rbps",
            ThrottleKind::WriteBps => "wbps",
            ThrottleKind::ReadIops => "riops",
            ThrottleKind::WriteIops => "wiops",
        }
    }
}

fn limit_text(limit: Option<u64>, v2: bool) -> String {
    match (limit, v2) {
        (Some(n), _) => n.to_string(),
        (None, true) => "max".to_owned(),
        (None, false) => "-1".to_owned(),
    }
}

fn invalid(setting: &'static str, value: impl fmt::Display, reason: &str) -> CgroupError {
    CgroupError::InvalidValue {
        setting,
        value: value.to_string(),
        reason: reason.to_owned(),
    }
}

impl DomainCgroup {
    /// Sets v1 `cpu.shares` (2..262144); on v2 writes the converted
    /// `cpu.weight`.
    pub fn set_cpu_shares(&self, scope: Scope, shares: u64) -> Result<(), CgroupError> {
        if !(MIN_SHARES..=MAX_SHARES).contains(&shares) {
            return Err(invalid("cpu shares", shares, "must be from 2 to 262144"));
        }
        let (group, dir) = self.dir(Controller::Cpu, scope)?;
        if group.v2 {
            write(
                &dir.join("cpu.weight"),
                &shares_to_weight(shares).to_string(),
            )
        } else {
            write(&dir.join("cpu.shares"), &shares.to_string())
        }
    }

    /// Sets the CFS bandwidth limit (`--cpus`, libvirt's vcpu_quota and
    /// vcpu_period); `None` lifts it.
    pub fn set_cpu_quota(&self, scope: Scope, quota: Option<CpuQuota>) -> Result<(), CgroupError> {
        if let Some(q) = quota {
            if !(MIN_PERIOD_US..=MAX_PERIOD_US).contains(&q.period_us) {
                return Err(invalid(
                    "cpu period",
                    q.period_us,
                    "must be from 1000 to 1000000 us",
                ));
            }
            if q.quota_us < MIN_PERIOD_US {
                return Err(invalid("cpu quota", q.quota_us, "must be at least 1000 us"));
            }
        }
        let (group, dir) = self.dir(Controller::Cpu, scope)?;
        match (group.v2, quota) {
            (true, Some(q)) => write(
                &dir.join("cpu.max"),
                &format!("{} {}", q.quota_us, q.period_us),
            ),
            (true, None) => write(&dir.join("cpu.max"), "max"),
            (false, Some(q)) => {
                write(&dir.join("cpu.cfs_period_us"), &q.period_us.to_string())?;
                write(&dir.join("cpu.cfs_quota_us"), &q.quota_us.to_string())
            }
            (false, None) => write(&dir.join("cpu.cfs_quota_us"), "-1"),
        }
    }

    /// Restricts `scope` to `cpus` (`--cpuset-cpus`, vcpupin).
    pub fn set_cpuset_cpus(&self, scope: Scope, cpus: &CpuList) -> Result<(), CgroupError> {
        self.set_cpuset(scope, "cpuset.cpus", cpus)
    }

    /// Restricts `scope` to memory nodes `mems` (`--cpuset-mems`).
    pub fn set_cpuset_mems(&self, scope: Scope, mems: &CpuList) -> Result<(), CgroupError> {
        self.set_cpuset(scope, "cpuset.mems", mems)
    }

    /// On v1 a child's set must stay inside its parent's, so a domain-wide
    /// change widens the domain to the union first, moves the children
    /// (keeping their pins where the new set allows), then narrows.
    fn set_cpuset(&self, scope: Scope, file: &str, new: &CpuList) -> Result<(), CgroupError> {
        if new.is_empty() {
            return Err(invalid("cpuset", file, "the set must not be empty"));
        }
        let (group, dir) = self.dir(Controller::Cpuset, scope)?;
        let path = dir.join(file);
        if group.v2 || scope != Scope::Domain {
            return write(&path, &new.to_string());
        }
        let old = read_list(&path)?;
        write(&path, &new.union(&old).to_string())?;
        for child in std::iter::once(Scope::Emulator).chain((0..self.vcpus).map(Scope::Vcpu)) {
            let child_path = self.scope_dir(group, child)?.join(file);
            let current = read_list(&child_path)?;
            let kept = current.intersection(new);
            let next = if current == old || kept.is_empty() {
                new.clone()
            } else {
                kept
            };
            write(&child_path, &next.to_string())?;
        }
        write(&path, &new.to_string())
    }

    /// Reads back the CPU settings of `scope`.
    pub fn cpu_limits(&self, scope: Scope) -> Result<CpuLimits, CgroupError> {
        let (group, dir) = self.dir(Controller::Cpu, scope)?;
        let (shares, quota_us, period_us) = if group.v2 {
            let weight = read_u64(&dir.join("cpu.weight"))?;
            let (quota, period) = read_cpu_max(&dir.join("cpu.max"))?;
            (weight_to_shares(weight), quota, period)
        } else {
            let quota = read_limit(&dir.join("cpu.cfs_quota_us"))?;
            (
                read_u64(&dir.join("cpu.shares"))?,
                quota,
                read_u64(&dir.join("cpu.cfs_period_us"))?,
            )
        };
        let (cpuset_group, cpuset_dir) = self.dir(Controller::Cpuset, scope)?;
        // An empty set (v2's default) means the parent's: report the effective one.
        let set = |name: &str| -> Result<CpuList, CgroupError> {
            let configured = read_list(&cpuset_dir.join(format!("cpuset.{name}")))?;
            if !configured.is_empty() {
                return Ok(configured);
            }
            let effective = if cpuset_group.v2 {
                format!("cpuset.{name}.effective")
            } else {
                format!("cpuset.effective_{name}")
            };
            read_list(&cpuset_dir.join(effective))
        };
        Ok(CpuLimits {
            shares,
            quota_us,
            period_us,
            cpus: set("cpus")?,
            mems: set("mems")?,
        })
    }

    /// Sets the memory limits with Docker's `--memory`/`--memory-swap`
    /// rules; v1 writes the two hard limits in the order the kernel accepts
    /// (memory+swap may never be below memory).
    pub fn set_memory(&self, limits: &MemoryLimits) -> Result<(), CgroupError> {
        if let Some(limit) = limits.limit.filter(|l| *l < MIN_MEMORY) {
            return Err(invalid("memory limit", limit, "must be at least 6 MiB"));
        }
        let memsw = memory_plus_swap(limits.limit, limits.swap)?;
        let (group, dir) = self.dir(Controller::Memory, Scope::Domain)?;
        if group.v2 {
            self.set_memory_v2(&dir, limits, memsw)
        } else {
            self.set_memory_v1(&dir, limits, memsw)
        }
    }

    fn set_memory_v1(
        &self,
        dir: &Path,
        limits: &MemoryLimits,
        memsw: Option<u64>,
    ) -> Result<(), CgroupError> {
        let mem_file = dir.join("memory.limit_in_bytes");
        let memsw_file = dir.join("memory.memsw.limit_in_bytes");
        let mem = limit_text(limits.limit, false);
        if memsw_file.exists() {
            let current_memsw = read_limit(&memsw_file)?.unwrap_or(u64::MAX);
            let memsw_text = limit_text(memsw, false);
            if limits.limit.unwrap_or(u64::MAX) > current_memsw {
                write(&memsw_file, &memsw_text)?;
                write(&mem_file, &mem)?;
            } else {
                write(&mem_file, &mem)?;
                write(&memsw_file, &memsw_text)?;
            }
        } else {
            self.no_swap_accounting(&memsw_file, limits.swap)?;
            write(&mem_file, &mem)?;
        }
        write(
            &dir.join("memory.soft_limit_in_bytes"),
            &limit_text(limits.soft, false),
        )
    }

    fn set_memory_v2(
        &self,
        dir: &Path,
        limits: &MemoryLimits,
        memsw: Option<u64>,
    ) -> Result<(), CgroupError> {
        write(&dir.join("memory.max"), &limit_text(limits.limit, true))?;
        let swap_file = dir.join("memory.swap.max");
        if swap_file.exists() {
            let swap = match (memsw, limits.limit) {
                (Some(total), Some(mem)) => Some(total - mem),
                _ => None,
            };
            write(&swap_file, &limit_text(swap, true))?;
        } else {
            self.no_swap_accounting(&swap_file, limits.swap)?;
        }
        write(
            &dir.join("memory.low"),
            &limits.soft.unwrap_or(0).to_string(),
        )
    }

    /// Without swap accounting only an explicit swap limit is an error;
    /// Docker's default (twice the memory) then simply does not apply.
    fn no_swap_accounting(&self, file: &Path, swap: MemorySwap) -> Result<(), CgroupError> {
        if let MemorySwap::Limit(_) = swap {
            return Err(CgroupError::Unsupported {
                domain: self.name.clone(),
                setting: "memory+swap limit",
                detail: format!(
                    "{} is missing: the kernel does not account swap",
                    file.display()
                ),
            });
        }
        tracing::warn!(domain = %self.name, file = %file.display(), "no swap accounting; swap is not limited");
        Ok(())
    }

    /// Reads back the memory limits.
    pub fn memory_limits(&self) -> Result<MemoryLimits, CgroupError> {
        let (group, dir) = self.dir(Controller::Memory, Scope::Domain)?;
        if group.v2 {
            let limit = read_limit(&dir.join("memory.max"))?;
            let low = read_u64(&dir.join("memory.low"))?;
            let swap_file = dir.join("memory.swap.max");
            let swap = match (limit, swap_file.exists()) {
                (Some(mem), true) => match read_limit(&swap_file)? {
                    Some(swap) => MemorySwap::Limit(mem + swap),
                    None => MemorySwap::Unlimited,
                },
                (None, true) => MemorySwap::Unlimited,
                (_, false) => MemorySwap::Unset,
            };
            return Ok(MemoryLimits {
                limit,
                soft: (low > 0).then_some(low),
                swap,
            });
        }
        let memsw_file = dir.join("memory.memsw.limit_in_bytes");
        let swap = if memsw_file.exists() {
            read_limit(&memsw_file)?.map_or(MemorySwap::Unlimited, MemorySwap::Limit)
        } else {
            MemorySwap::Unset
        };
        Ok(MemoryLimits {
            limit: read_limit(&dir.join("memory.limit_in_bytes"))?,
            soft: read_limit(&dir.join("memory.soft_limit_in_bytes"))?,
            swap,
        })
    }

    /// Caps the number of tasks (`--pids-limit`); `None` lifts the cap.
    pub fn set_pids_limit(&self, limit: Option<u64>) -> Result<(), CgroupError> {
        if limit == Some(0) {
            return Err(invalid("pids limit", 0, "must be at least 1"));
        }
        let (_, dir) = self.dir(Controller::Pids, Scope::Domain)?;
        write(&dir.join("pids.max"), &limit_text(limit, true))
    }

    pub fn pids_limit(&self) -> Result<Option<u64>, CgroupError> {
        let (_, dir) = self.dir(Controller::Pids, Scope::Domain)?;
        read_limit(&dir.join("pids.max"))
    }

    /// Sets the proportional block I/O weight on the v1 scale (10..1000,
    /// `--blkio-weight`); v2 gets the converted `io.weight`.
    pub fn set_blkio_weight(&self, weight: u64) -> Result<(), CgroupError> {
        if !(MIN_BLKIO_WEIGHT..=MAX_BLKIO_WEIGHT).contains(&weight) {
            return Err(invalid("blkio weight", weight, "must be from 10 to 1000"));
        }
        let (group, dir) = self.dir(Controller::Io, Scope::Domain)?;
        let Some(file) = self.weight_file(group.v2, &dir)? else {
            return Err(self.no_weight_file(&dir));
        };
        let value = if group.v2 {
            format!("default {}", blkio_weight_to_io_weight(weight))
        } else {
            weight.to_string()
        };
        write(&dir.join(file), &value)
    }

    fn weight_file(&self, v2: bool, dir: &Path) -> Result<Option<&'static str>, CgroupError> {
        let candidates: [&'static str; 2] = if v2 {
            ["io.weight", "io.bfq.weight"]
        } else {
            ["blkio.weight", "blkio.bfq.weight"]
        };
        Ok(candidates.into_iter().find(|f| dir.join(f).exists()))
    }

    fn no_weight_file(&self, dir: &Path) -> CgroupError {
        CgroupError::Unsupported {
            domain: self.name.clone(),
            setting: "block I/O weight",
            detail: format!(
                "{} has no blkio.weight, blkio.bfq.weight, io.weight or io.bfq.weight \
                 (no proportional-weight I/O scheduler on this kernel)",
                dir.display()
            ),
        }
    }

    /// Sets or (with `None`) lifts one per-device throttle
    /// (`--device-read-bps` and friends, blkdeviotune).
    pub fn set_throttle(
        &self,
        device: DeviceNumber,
        kind: ThrottleKind,
        limit: Option<u64>,
    ) -> Result<(), CgroupError> {
        if limit == Some(0) {
            return Err(invalid(
                "I/O throttle",
                0,
                "must be at least 1 (use no limit to lift it)",
            ));
        }
        let (group, dir) = self.dir(Controller::Io, Scope::Domain)?;
        if group.v2 {
            let value = format!("{device} {}={}", kind.v2_key(), limit_text(limit, true));
            write(&dir.join("io.max"), &value)
        } else {
            let value = format!("{device} {}", limit.unwrap_or(0));
            write(&dir.join(kind.v1_file()), &value)
        }
    }

    /// Reads back the I/O weight and throttles.
    pub fn io_limits(&self) -> Result<IoLimits, CgroupError> {
        let (group, dir) = self.dir(Controller::Io, Scope::Domain)?;
        let weight = match self.weight_file(group.v2, &dir)? {
            Some(file) => Some(read_weight(&dir.join(file), group.v2)?),
            None => None,
        };
        let mut throttles = Vec::new();
        if group.v2 {
            throttles = read_io_max(&dir.join("io.max"))?;
        } else {
            for kind in ThrottleKind::ALL {
                throttles.extend(read_v1_throttles(&dir.join(kind.v1_file()), kind)?);
            }
        }
        throttles.sort();
        Ok(IoLimits { weight, throttles })
    }

    /// Gives the vCPU groups real-time CPU time (`cpu.rt_runtime_us`, in
    /// each second) where the kernel schedules real-time tasks per group
    /// (v1 with CONFIG_RT_GROUP_SCHED): there a thread in a group with no
    /// real-time budget cannot become real-time. `domain_us` is split
    /// evenly over the vCPUs; every ancestor below the root is raised to
    /// what its children then need. Elsewhere this is a no-op.
    pub fn grant_realtime(&self, domain_us: u64) -> Result<(), CgroupError> {
        const FILE: &str = "cpu.rt_runtime_us";
        let group = self.group(Controller::Cpu)?;
        if group.v2 || !group.dir.join(FILE).exists() {
            return Ok(());
        }
        let per_vcpu = domain_us / u64::from(self.vcpus.max(1));
        let domain = per_vcpu * u64::from(self.vcpus);
        // From the domain up to just below the root (whose budget is the
        // kernel's global one).
        let chain: Vec<&Path> = group
            .dir
            .ancestors()
            .take_while(|d| d.parent().is_some_and(|p| p.join(FILE).exists()))
            .collect();
        let mut needs = Vec::with_capacity(chain.len());
        let mut need = domain;
        for (i, dir) in chain.iter().enumerate() {
            if i > 0 {
                need = need.max(read_u64(&dir.join(FILE))?);
                needs.push(need);
            } else {
                needs.push(domain);
            }
            let siblings = match dir.parent() {
                Some(parent) => children_runtime(parent, dir, FILE)?,
                None => 0,
            };
            need += siblings;
        }
        for (dir, need) in chain.iter().zip(&needs).rev() {
            write(&dir.join(FILE), &need.to_string())?;
        }
        for vcpu in 0..self.vcpus {
            let dir = self.scope_dir(group, Scope::Vcpu(vcpu))?;
            write(&dir.join(FILE), &per_vcpu.to_string())?;
        }
        Ok(())
    }

    /// CPU time used by the tasks of `scope`, in nanoseconds.
    pub fn cpu_usage_ns(&self, scope: Scope) -> Result<u64, CgroupError> {
        let (group, dir) = self.dir(Controller::Cpuacct, scope)?;
        if group.v2 {
            let file = dir.join("cpu.stat");
            let usec = read_keyed(&file, "usage_usec")?
                .ok_or_else(|| parse_error(&file, "no usage_usec line"))?;
            Ok(usec * 1000)
        } else {
            read_u64(&dir.join("cpuacct.usage"))
        }
    }

    /// The domain's usage counters.
    pub fn stats(&self) -> Result<Stats, CgroupError> {
        let mut stats = Stats {
            cpu_usage_ns: self.cpu_usage_ns(Scope::Domain)?,
            memory_usage: None,
            oom_kills: None,
            pids: None,
        };
        if let Ok((group, dir)) = self.dir(Controller::Memory, Scope::Domain) {
            let (usage, events) = if group.v2 {
                ("memory.current", "memory.events")
            } else {
                ("memory.usage_in_bytes", "memory.oom_control")
            };
            stats.memory_usage = Some(read_u64(&dir.join(usage))?);
            stats.oom_kills = read_keyed(&dir.join(events), "oom_kill")?;
        }
        if let Ok((_, dir)) = self.dir(Controller::Pids, Scope::Domain) {
            stats.pids = Some(read_u64(&dir.join("pids.current"))?);
        }
        Ok(stats)
    }
}

fn read_list(path: &Path) -> Result<CpuList, CgroupError> {
    read(path)?
        .parse()
        .map_err(|e: super::CpuListError| parse_error(path, e.to_string()))
}

/// `cpu.max`: `max 100000` or `50000 100000`.
fn read_cpu_max(path: &Path) -> Result<(Option<u64>, u64), CgroupError> {
    let text = read(path)?;
    let mut words = text.split_whitespace();
    let quota = words.next().and_then(parse_limit);
    let period = words.next().and_then(|p| p.parse().ok());
    match (quota, period) {
        (Some(q), Some(p)) => Ok((q, p)),
        _ => Err(parse_error(
            path,
            format!("{:?} is not \"QUOTA PERIOD\"", text.trim()),
        )),
    }
}

/// `blkio.weight` holds a number; `io.weight` `default N` and per-device lines.
fn read_weight(path: &Path, v2: bool) -> Result<u64, CgroupError> {
    let text = read(path)?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("default ").or((!v2).then_some(l)))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| parse_error(path, format!("no weight in {:?}", text.trim())))?;
    Ok(if v2 {
        io_weight_to_blkio_weight(value)
    } else {
        value
    })
}

fn read_v1_throttles(path: &Path, kind: ThrottleKind) -> Result<Vec<Throttle>, CgroupError> {
    let text = read(path)?;
    text.lines()
        .map(|line| {
            let parsed = line.split_once(' ').and_then(|(dev, limit)| {
                Some(Throttle {
                    device: dev.parse().ok()?,
                    kind,
                    limit: limit.trim().parse().ok()?,
                })
            });
            parsed.ok_or_else(|| parse_error(path, format!("malformed line {line:?}")))
        })
        .collect()
}

/// `io.max` lines: `254:0 rbps=1048576 wbps=max riops=max wiops=max`.
fn read_io_max(path: &Path) -> Result<Vec<Throttle>, CgroupError> {
    let text = read(path)?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let device: DeviceNumber = words
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|_| parse_error(path, format!("malformed line {line:?}")))?;
        for word in words {
            let Some((key, value)) = word.split_once('=') else {
                return Err(parse_error(path, format!("malformed line {line:?}")));
            };
            let kind = ThrottleKind::ALL.into_iter().find(|k| k.v2_key() == key);
            if let (Some(kind), Some(Some(limit))) = (kind, parse_limit(value)) {
                out.push(Throttle {
                    device,
                    kind,
                    limit,
                });
            }
        }
    }
    Ok(out)
}

/// The real-time budget the children of `parent` other than `except` hold.
fn children_runtime(parent: &Path, except: &Path, file: &str) -> Result<u64, CgroupError> {
    let entries = std::fs::read_dir(parent).map_err(|source| CgroupError::Read {
        path: parent.to_owned(),
        source,
    })?;
    let mut sum = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path != except && path.join(file).exists() {
            sum += read_u64(&path.join(file))?;
        }
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers() {
        let dev: DeviceNumber = "254:16".parse().unwrap();
        assert_eq!((dev.major, dev.minor), (254, 16));
        assert_eq!(dev.to_string(), "254:16");
        for bad in ["254", "a:b", "1:2:3", ""] {
            assert!(bad.parse::<DeviceNumber>().is_err(), "{bad}");
        }
        let null = DeviceNumber::of_block_device(Path::new("/dev/null")).unwrap_err();
        assert!(null.to_string().contains("/dev/null"), "{null}");
        assert!(null.to_string().contains("not a block device"), "{null}");
    }

    #[test]
    fn io_max_lines() {
        let dir = std::env::temp_dir().join(format!("oxvirt-io-max-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("io.max");
        std::fs::write(&file, "254:0 rbps=1048576 wbps=max riops=max wiops=100\n").unwrap();
        let got = read_io_max(&file).unwrap();
        std::fs::write(&file, "254:0 rbps\n").unwrap();
        let err = read_io_max(&file).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        let dev = DeviceNumber {
            major: 254,
            minor: 0,
        };
        assert_eq!(
            got,
            vec![
                Throttle {
                    device: dev,
                    kind: ThrottleKind::ReadBps,
                    limit: 1 << 20
                },
                Throttle {
                    device: dev,
                    kind: ThrottleKind::WriteIops,
                    limit: 100
                },
            ]
        );
        assert!(err.to_string().contains("io.max"), "{err}");
    }
}
