//! Domain definitions: one human-editable TOML file per domain, checked
//! strictly (unknown keys are errors) and written atomically.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use host::cgroup::CpuList;
use host::size::{self, MemorySwap};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::devices::{disk_index, is_false, DeviceProblem, Disk, Nic};

/// Errors reading, checking or writing a definition.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{origin}: line {line}: {message}")]
    Parse {
        origin: String,
        line: usize,
        message: String,
    },
    #[error("domain {domain:?}: {field}: {reason}")]
    Invalid {
        domain: String,
        field: &'static str,
        reason: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("domain {domain:?}: cannot write the definition: {source}")]
    Serialize {
        domain: String,
        source: toml::ser::Error,
    },
}

impl ConfigError {
    /// The field the error is about, where there is one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

const MIB: u64 = 1 << 20;
/// The VMM's own floor for guest RAM.
const MIN_MEMORY: u64 = 4 * MIB;
const MAX_MEMORY: u64 = 1 << 40;
const MAX_VCPUS: u32 = 254;
const MAX_NAME: usize = 64;

/// One domain, as written in `domains/NAME.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainDef {
    pub name: String,
    /// Guest RAM (a size such as "512m", or bytes).
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    /// The most `setmem` may give the guest (virsh's maximum memory);
    /// unset: `memory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<ByteSize>,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// The VMM's CPUID profile (host or pvm-compat).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_profile: Option<String>,
    /// Guest disks, in order: vda, vdb, ...
    #[serde(default, rename = "disk", skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    /// Network interfaces on the daemon's NAT network.
    #[serde(default, rename = "nic", skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// A virtio-rng device fed from the host's getrandom.
    #[serde(default, skip_serializing_if = "is_false")]
    pub rng: bool,
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    /// A cloud-init NoCloud seed attached as a read-only disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<crate::cloudinit::CloudInit>,
}

/// Cgroup limits, with Docker's and libvirt's meanings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Relative CPU weight (`--cpu-shares`, schedinfo cpu_shares).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_shares: Option<u64>,
    /// CPUs the whole domain may use (`--cpus 1.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// CFS period of each vCPU in microseconds (schedinfo vcpu_period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_period: Option<u64>,
    /// CFS quota of each vCPU in microseconds (schedinfo vcpu_quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_quota: Option<u64>,
    /// `--cpuset-cpus 0,1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuset_cpus: Option<String>,
    /// `--cpuset-mems 0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuset_mems: Option<String>,
    /// vcpupin: vCPU number -> host CPU list.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vcpupin: BTreeMap<String, String>,
    /// Hard memory limit of the whole VMM (memtune hard_limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<ByteSize>,
    /// memtune soft_limit (`--memory-reservation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_soft_limit: Option<ByteSize>,
    /// Memory plus swap (`--memory-swap`, memtune swap_hard_limit); -1 is
    /// unlimited, unset is twice the memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_swap: Option<SwapSetting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<u64>,
    /// Block I/O weight (`--blkio-weight`, blkiotune weight; 10..1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blkio_weight: Option<u64>,
    /// Host block device throttles, Docker's syntax ("/dev/sda:1mb").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_read_bps: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_write_bps: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_read_iops: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_write_iops: Vec<String>,
    /// Real-time vCPU threads (`--cap-add sys_nice`, libvirt's vcpusched):
    /// "fifo" or "rr", optionally with a priority ("fifo:10", default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_sched: Option<String>,
}

impl Resources {
    fn is_empty(&self) -> bool {
        *self == Resources::default()
    }
}

fn default_memory() -> ByteSize {
    ByteSize(128 * MIB)
}

fn default_vcpus() -> u32 {
    1
}

/// A size in bytes, written as "512m" or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, scale) in [("g", 1u64 << 30), ("m", 1 << 20), ("k", 1 << 10)] {
            if self.0 >= scale && self.0.is_multiple_of(scale) {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumberOrText::deserialize(d)? {
            NumberOrText::Number(n) => u64::try_from(n)
                .map(ByteSize)
                .map_err(|_| serde::de::Error::custom(format!("size {n} is negative"))),
            NumberOrText::Text(t) => size::parse_bytes(&t)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// `--memory-swap`: -1 (unlimited) or a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwapSetting(pub MemorySwap);

impl Serialize for SwapSetting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            MemorySwap::Limit(n) => s.serialize_str(&ByteSize(n).to_string()),
            MemorySwap::Unlimited | MemorySwap::Unset => s.serialize_i64(-1),
        }
    }
}

impl<'de> Deserialize<'de> for SwapSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = match NumberOrText::deserialize(d)? {
            NumberOrText::Number(n) => n.to_string(),
            NumberOrText::Text(t) => t,
        };
        size::parse_memory_swap(&text)
            .map(SwapSetting)
            .map_err(serde::de::Error::custom)
    }
}

impl DomainDef {
    /// Parses a definition; `origin` names it in errors (a file name).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            line: e.span().map_or(1, |s| line_of(text, s.start)),
            message: e.message().to_owned(),
        })
    }

    /// Reads and checks one definition file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let def = Self::parse(&text, &path.display().to_string())?;
        def.validate()?;
        Ok(def)
    }

    /// The definition as TOML text.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|source| ConfigError::Serialize {
            domain: self.name.clone(),
            source,
        })
    }

    fn invalid(&self, field: &'static str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            domain: self.name.clone(),
            field,
            reason: reason.into(),
        }
    }

    /// Checks everything a start would trip over, except resources the
    /// host lacks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_name(&self.name).map_err(|reason| self.invalid("name", reason))?;
        self.check_file("kernel", &self.kernel)?;
        if let Some(initrd) = &self.initrd {
            self.check_file("initrd", initrd)?;
        }
        let memory = self.memory.0;
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&memory) || !memory.is_multiple_of(MIB) {
            return Err(self.invalid(
                "memory",
                format!(
                    "{} bytes: must be a whole number of MiB between 4 MiB and 1 TiB",
                    memory
                ),
            ));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(self.invalid(
                "vcpus",
                format!("{}: must be between 1 and {MAX_VCPUS}", self.vcpus),
            ));
        }
        if let Some(max) = self.max_memory {
            if max.0 < memory {
                return Err(self.invalid(
                    "max_memory",
                    format!("{max}: below memory ({})", self.memory),
                ));
            }
        }
        self.validate_devices()?;
        if let Some(profile) = &self.cpu_profile {
            if profile != "host" && profile != "pvm-compat" {
                return Err(self.invalid(
                    "cpu_profile",
                    format!("{profile:?}: expected host or pvm-compat"),
                ));
            }
        }
        self.validate_resources()
    }

    fn validate_devices(&self) -> Result<(), ConfigError> {
        let device_err = |p: DeviceProblem| self.invalid(p.field, p.reason);
        for disk in &self.disks {
            disk.validate().map_err(device_err)?;
        }
        for nic in &self.nics {
            nic.validate().map_err(device_err)?;
        }
        if let Some(cloud_init) = &self.cloud_init {
            cloud_init.validate().map_err(device_err)?;
        }
        Ok(())
    }

    fn check_file(&self, field: &'static str, path: &Path) -> Result<(), ConfigError> {
        if !path.is_absolute() {
            return Err(self.invalid(
                field,
                format!("{}: must be an absolute path", path.display()),
            ));
        }
        match std::fs::metadata(path) {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(self.invalid(field, format!("{}: not a regular file", path.display()))),
            Err(e) => Err(self.invalid(field, format!("{}: {e}", path.display()))),
        }
    }

    fn validate_resources(&self) -> Result<(), ConfigError> {
        let r = &self.resources;
        if let Some(shares) = r.cpu_shares {
            if !(2..=262_144).contains(&shares) {
                return Err(self.invalid(
                    "resources.cpu_shares",
                    format!("{shares}: must be 2..262144"),
                ));
            }
        }
        if let Some(cpus) = r.cpus {
            size::parse_cpus(&cpus.to_string())
                .map_err(|e| self.invalid("resources.cpus", e.to_string()))?;
        }
        if let Some(period) = r.vcpu_period {
            if !(1_000..=1_000_000).contains(&period) {
                return Err(self.invalid(
                    "resources.vcpu_period",
                    format!("{period}: must be 1000..1000000 us"),
                ));
            }
        }
        if let Some(quota) = r.vcpu_quota {
            if quota < 1_000 {
                return Err(self.invalid(
                    "resources.vcpu_quota",
                    format!("{quota}: must be at least 1000 us"),
                ));
            }
        }
        for (field, list) in [
            ("resources.cpuset_cpus", &r.cpuset_cpus),
            ("resources.cpuset_mems", &r.cpuset_mems),
        ] {
            if let Some(list) = list {
                list.parse::<CpuList>()
                    .map_err(|e| self.invalid(field, e.to_string()))?;
            }
        }
        for (vcpu, cpus) in &r.vcpupin {
            self.vcpu_number(vcpu)?;
            cpus.parse::<CpuList>()
                .map_err(|e| self.invalid("resources.vcpupin", e.to_string()))?;
        }
        if let Some(limit) = r.memory_limit {
            if limit.0 < 6 * MIB {
                return Err(self.invalid(
                    "resources.memory_limit",
                    "must be at least 6 MiB (Docker's minimum)",
                ));
            }
        }
        if let Some(swap) = r.memory_swap {
            host::cgroup::memory_plus_swap(r.memory_limit.map(|l| l.0), swap.0)
                .map_err(|e| self.invalid("resources.memory_swap", e.to_string()))?;
        }
        if let Some(weight) = r.blkio_weight {
            if !(10..=1000).contains(&weight) {
                return Err(self.invalid(
                    "resources.blkio_weight",
                    format!("{weight}: must be 10..1000"),
                ));
            }
        }
        if let Some(sched) = &r.vcpu_sched {
            parse_vcpu_sched(sched).map_err(|e| self.invalid("resources.vcpu_sched", e))?;
        }
        if r.pids_limit == Some(0) {
            return Err(self.invalid("resources.pids_limit", "must be at least 1"));
        }
        self.validate_throttles()
    }

    fn validate_throttles(&self) -> Result<(), ConfigError> {
        for (field, rate) in self.throttle_specs() {
            let parsed = if field.ends_with("bps") {
                size::parse_device_bps(rate)
            } else {
                size::parse_device_iops(rate)
            };
            let parsed = parsed.map_err(|e| self.invalid(field, e.to_string()))?;
            if disk_index(&parsed.device).is_some() {
                return Err(self.invalid(
                    field,
                    format!("{}: a guest disk's limits go in its [[disk]] throttle (oxvirt run and blkdeviotune put them there)", parsed.device),
                ));
            }
            if !parsed.device.starts_with('/') {
                return Err(self.invalid(
                    field,
                    format!("{}: expected a host block device (/dev/...)", parsed.device),
                ));
            }
        }
        Ok(())
    }

    /// Every throttle entry with the field it came from.
    pub fn throttle_specs(&self) -> Vec<(&'static str, &String)> {
        let r = &self.resources;
        [
            ("resources.device_read_bps", &r.device_read_bps),
            ("resources.device_write_bps", &r.device_write_bps),
            ("resources.device_read_iops", &r.device_read_iops),
            ("resources.device_write_iops", &r.device_write_iops),
        ]
        .into_iter()
        .flat_map(|(field, specs)| specs.iter().map(move |s| (field, s)))
        .collect()
    }

    /// A vcpupin key as a vCPU number of this domain.
    pub fn vcpu_number(&self, key: &str) -> Result<u32, ConfigError> {
        match key.parse::<u32>() {
            Ok(n) if n < self.vcpus => Ok(n),
            _ => Err(self.invalid(
                "resources.vcpupin",
                format!("{key:?}: not a vCPU of this domain (it has {})", self.vcpus),
            )),
        }
    }
}

/// A real-time scheduling class for vCPU threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RtPolicy {
    Fifo,
    RoundRobin,
}

/// `vcpu_sched`: "fifo" or "rr", optionally ":PRIORITY" (1..99, default 1).
pub fn parse_vcpu_sched(text: &str) -> Result<(RtPolicy, u8), String> {
    let (policy, priority) = text.split_once(':').unwrap_or((text, "1"));
    let policy = match policy {
        "fifo" => RtPolicy::Fifo,
        "rr" => RtPolicy::RoundRobin,
        _ => {
            return Err(format!(
                "{text:?}: expected fifo or rr, optionally :PRIORITY"
            ))
        }
    };
    match priority.parse::<u8>() {
        Ok(p @ 1..=99) => Ok((policy, p)),
        _ => Err(format!("{text:?}: the priority must be 1..99")),
    }
}

/// Domain names become file and cgroup names: letters, digits, `.`, `_`,
/// `-`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), String> {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let all_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > MAX_NAME || !first_ok || !all_ok {
        return Err(format!(
            "{name:?}: must be 1..{MAX_NAME} letters, digits, '.', '_' or '-', starting with a letter or digit"
        ));
    }
    Ok(())
}

pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Writes `data` to `path` so that readers see the old or the new file,
/// never a torn one: a temporary file in the same folder, fsync, rename,
/// fsync of the folder.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ConfigError> {
    let io = |source| ConfigError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        // Best effort: the temporary file is ours and useless now.
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}
