//! The VM's settings: from command-line flags, a TOML or JSON file, or both
//! (flags override the file), validated into a [`VmConfig`].

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::cpuid::CpuProfile;
use crate::device_config::{self, DeviceConfigError, DeviceSetting, DiskConfig, NicConfig};
use crate::migration::MigrationUri;

/// Errors in the VM's settings.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("no kernel given (--kernel FILE or `kernel` in the config file)")]
    NoKernel,
    #[error("memory {0:?}: expected a size such as 512M, 2G or a number of MiB")]
    BadSize(String),
    #[error("memory {size} bytes: at least {min} bytes (4 MiB) are needed")]
    MemoryTooSmall { size: u64, min: u64 },
    #[error("vcpus {0}: at least one vCPU is needed")]
    NoVcpus(u32),
    #[error("serial {0:?}: expected stdio, file:PATH or unix:PATH")]
    BadSerial(String),
    #[error("cpu-profile {0:?}: expected host or pvm-compat")]
    BadCpuProfile(String),
    #[error("cmdline: {len} bytes is longer than the {max} bytes Linux accepts")]
    CmdlineTooLong { len: usize, max: usize },
    #[error(transparent)]
    Device(#[from] DeviceConfigError),
    #[error("incoming: {0}")]
    Incoming(crate::migration::TransportError),
    #[error("device id {0:?} is used twice (ids name disks and NICs in the control API)")]
    DuplicateId(String),
}

/// Smallest guest: room for the boot structures, tables and a small kernel.
pub const MIN_MEMORY: u64 = 4 << 20;
pub const DEFAULT_MEMORY: u64 = 128 << 20;
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    /// The VMM's stdout (output) and stdin (input).
    Stdio,
    /// Output appended to a file created or truncated at start; no input.
    File(PathBuf),
    /// A unix socket the VMM listens on; one client at a time gets output
    /// and sends input. Output while no client is connected is dropped.
    Unix(PathBuf),
}

impl SerialTarget {
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::BadSerial(text.to_owned());
        match text.split_once(':') {
            None if text == "stdio" => Ok(SerialTarget::Stdio),
            Some(("file", path)) if !path.is_empty() => Ok(SerialTarget::File(path.into())),
            Some(("unix", path)) if !path.is_empty() => Ok(SerialTarget::Unix(path.into())),
            _ => Err(bad()),
        }
    }
}

/// A memory size as written in a file: a number of MiB or a string with a
/// unit suffix.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeSetting {
    Mib(u64),
    Text(String),
}

/// Settings as given, each optional; the same names in flags and files.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub memory: Option<SizeSetting>,
    pub vcpus: Option<u32>,
    pub serial: Option<String>,
    pub api: Option<PathBuf>,
    pub cpu_profile: Option<String>,
    /// Disks: `path=FILE,format=..,readonly=on,...` or tables (`[[disk]]`).
    pub disk: Option<Vec<DeviceSetting>>,
    /// NICs over taps: `tap=NAME,mac=..,bps=..,pps=..` or tables (`[[net]]`).
    pub net: Option<Vec<DeviceSetting>>,
    /// A virtio-rng device.
    pub rng: Option<bool>,
    /// Wait for a migration stream (tcp:, unix:, exec:, fd:, file:) instead
    /// of booting the kernel.
    pub incoming: Option<String>,
    /// Start with the vCPUs stopped until `cont` (QEMU's `-S`).
    pub paused: Option<bool>,
}

impl Settings {
    /// Reads a TOML file, or JSON when the name ends in `.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let parse_err = |message: String| ConfigError::Parse {
            path: path.to_owned(),
            message,
        };
        if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text).map_err(|e| parse_err(e.to_string()))
        } else {
            toml::from_str(&text)
                .map_err(|e| parse_err(e.to_string().trim_end().replace('\n', " ")))
        }
    }

    /// These settings, with every one that `over` gives replaced by it.
    pub fn overridden_by(self, over: Settings) -> Settings {
        Settings {
            kernel: over.kernel.or(self.kernel),
            initrd: over.initrd.or(self.initrd),
            cmdline: over.cmdline.or(self.cmdline),
            memory: over.memory.or(self.memory),
            vcpus: over.vcpus.or(self.vcpus),
            serial: over.serial.or(self.serial),
            api: over.api.or(self.api),
            cpu_profile: over.cpu_profile.or(self.cpu_profile),
            disk: over.disk.or(self.disk),
            net: over.net.or(self.net),
            rng: over.rng.or(self.rng),
            incoming: over.incoming.or(self.incoming),
            paused: over.paused.or(self.paused),
        }
    }

    /// Validates the settings that need no KVM or file access.
    pub fn into_config(self) -> Result<VmConfig, ConfigError> {
        let memory = match self.memory {
            None => DEFAULT_MEMORY,
            Some(SizeSetting::Mib(mib)) => mib
                .checked_mul(1 << 20)
                .ok_or_else(|| ConfigError::BadSize(mib.to_string()))?,
            Some(SizeSetting::Text(text)) => parse_size(&text)?,
        };
        if memory < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall {
                size: memory,
                min: MIN_MEMORY,
            });
        }
        let vcpus = self.vcpus.unwrap_or(1);
        if vcpus == 0 {
            return Err(ConfigError::NoVcpus(vcpus));
        }
        let cmdline = self.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_owned());
        if cmdline.len() >= crate::layout::CMDLINE_MAX {
            return Err(ConfigError::CmdlineTooLong {
                len: cmdline.len(),
                max: crate::layout::CMDLINE_MAX - 1,
            });
        }
        let cpu_profile = match self.cpu_profile.as_deref() {
            None | Some("host") => CpuProfile::Host,
            Some("pvm-compat") => CpuProfile::PvmCompat,
            Some(other) => return Err(ConfigError::BadCpuProfile(other.to_owned())),
        };
        let disks = (self.disk.unwrap_or_default().iter().enumerate())
            .map(|(i, d)| device_config::parse_disk(d, i))
            .collect::<Result<Vec<_>, _>>()?;
        let nics = (self.net.unwrap_or_default().iter().enumerate())
            .map(|(i, n)| device_config::parse_nic(n, i))
            .collect::<Result<Vec<_>, _>>()?;
        check_unique_ids(&disks, &nics)?;
        Ok(VmConfig {
            kernel: self.kernel.ok_or(ConfigError::NoKernel)?,
            initrd: self.initrd,
            cmdline,
            memory,
            vcpus,
            serial: SerialTarget::parse(self.serial.as_deref().unwrap_or("stdio"))?,
            api: self.api,
            cpu_profile,
            disks,
            nics,
            rng: self.rng.unwrap_or(false),
            incoming: match self.incoming {
                Some(uri) => Some(uri.parse().map_err(ConfigError::Incoming)?),
                None => None,
            },
            paused: self.paused.unwrap_or(false),
        })
    }
}

fn check_unique_ids(disks: &[DiskConfig], nics: &[NicConfig]) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    let ids = disks
        .iter()
        .map(|d| &d.id)
        .chain(nics.iter().map(|n| &n.id));
    for id in ids {
        if !seen.insert(id) {
            return Err(ConfigError::DuplicateId(id.clone()));
        }
    }
    Ok(())
}

/// Parses `512M`, `2G`, `1024K`, `65536` (plain numbers are MiB, as QEMU's
/// `-m`); suffixes are binary (K = 1024).
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(text.to_owned());
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last().ok_or_else(bad)? {
        (i, 'k' | 'K') => (&t[..i], 10),
        (i, 'm' | 'M') => (&t[..i], 20),
        (i, 'g' | 'G') => (&t[..i], 30),
        (i, 't' | 'T') => (&t[..i], 40),
        _ => (t, 20),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// A validated VM configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    pub vcpus: u32,
    pub serial: SerialTarget,
    pub api: Option<PathBuf>,
    pub cpu_profile: CpuProfile,
    pub disks: Vec<DiskConfig>,
    pub nics: Vec<NicConfig>,
    pub rng: bool,
    pub incoming: Option<MigrationUri>,
    /// The vCPUs wait for `cont` after boot set-up or an incoming
    /// migration instead of running at once.
    pub paused: bool,
}

/// The host's RAM plus swap in bytes (`/proc/meminfo`), the most guest
/// memory the kernel would let us touch.
pub fn host_memory_limit() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = info.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some(field("MemTotal:")? + field("SwapTotal:").unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_kernel() -> Settings {
        Settings {
            kernel: Some("k".into()),
            ..Settings::default()
        }
    }

    #[test]
    fn sizes_parse_like_qemu() {
        assert_eq!(parse_size("512").unwrap(), 512 << 20);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096K").unwrap(), 4 << 20);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn defaults_and_limits() {
        let cfg = with_kernel().into_config().unwrap();
        assert_eq!(cfg.memory, DEFAULT_MEMORY);
        assert_eq!(cfg.vcpus, 1);
        assert_eq!(cfg.serial, SerialTarget::Stdio);
        assert_eq!(cfg.cpu_profile, CpuProfile::Host);
        let small = Settings {
            memory: Some(SizeSetting::Text("1M".into())),
            ..with_kernel()
        };
        assert!(matches!(
            small.into_config(),
            Err(ConfigError::MemoryTooSmall { .. })
        ));
        let none = Settings {
            vcpus: Some(0),
            ..with_kernel()
        };
        assert!(matches!(none.into_config(), Err(ConfigError::NoVcpus(0))));
        assert!(matches!(
            Settings::default().into_config(),
            Err(ConfigError::NoKernel)
        ));
    }

    #[test]
    fn serial_targets() {
        assert_eq!(
            SerialTarget::parse("file:/tmp/x").unwrap(),
            SerialTarget::File("/tmp/x".into())
        );
        assert_eq!(
            SerialTarget::parse("unix:/tmp/s").unwrap(),
            SerialTarget::Unix("/tmp/s".into())
        );
        assert!(SerialTarget::parse("tcp:1").is_err());
        assert!(SerialTarget::parse("file:").is_err());
    }

    #[test]
    fn toml_and_json_files_and_overrides() {
        let dir = std::env::temp_dir().join(format!("oxvirt-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml_path = dir.join("vm.toml");
        std::fs::write(
            &toml_path,
            "kernel = \"/k\"\nmemory = \"256M\"\nvcpus = 2\ncpu-profile = \"pvm-compat\"\npaused = true\n",
        )
        .unwrap();
        let cfg = Settings::from_file(&toml_path)
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!((cfg.memory, cfg.vcpus), (256 << 20, 2));
        assert_eq!(cfg.cpu_profile, CpuProfile::PvmCompat);
        assert!(cfg.paused);
        let json_path = dir.join("vm.json");
        std::fs::write(&json_path, r#"{"kernel": "/k", "memory": 64}"#).unwrap();
        let over = Settings {
            vcpus: Some(3),
            ..Settings::default()
        };
        let cfg = Settings::from_file(&json_path)
            .unwrap()
            .overridden_by(over)
            .into_config()
            .unwrap();
        assert_eq!((cfg.memory, cfg.vcpus), (64 << 20, 3));
        assert!(!cfg.paused, "not paused unless asked");
        std::fs::write(&toml_path, "kernel = \"/k\"\nmemroy = 1\n").unwrap();
        let err = Settings::from_file(&toml_path).unwrap_err().to_string();
        assert!(err.contains("memroy") && err.contains("vm.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
