//! `oxvirt run`'s Docker-style flags turned into a domain definition, with
//! Docker's meanings carried over to a VM.

use std::path::PathBuf;

use host::size::{self, MemorySwap, SizeError};

use crate::config::{check_name, ByteSize, DomainDef, Resources, SwapSetting};
use crate::devices::{disk_index, Disk, DiskThrottle, Nic};

/// What the VMM process needs beyond guest RAM (its code, page tables,
/// KVM's structures and thread stacks): `--memory` sets the guest's RAM
/// and a hard limit of that plus this, so the guest can use all its RAM.
pub const VMM_OVERHEAD: u64 = 32 << 20;

/// Errors in `oxvirt run`'s flags.
#[derive(Debug, thiserror::Error)]
pub enum RunSpecError {
    #[error("--{flag}: {source}")]
    Size {
        flag: &'static str,
        source: SizeError,
    },
    #[error("--{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
}

/// `oxvirt run`'s flags.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    pub name: Option<String>,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    pub vcpus: Option<u32>,
    pub cpu_profile: Option<String>,
    pub cpus: Option<String>,
    pub cpu_shares: Option<u64>,
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    pub memory: Option<String>,
    pub guest_memory: Option<String>,
    pub memory_swap: Option<String>,
    pub memory_reservation: Option<String>,
    pub pids_limit: Option<u64>,
    pub device_read_bps: Vec<String>,
    pub device_write_bps: Vec<String>,
    pub device_read_iops: Vec<String>,
    pub device_write_iops: Vec<String>,
    /// `--disk path=FILE[,format=F][,readonly=on][,cache=C][,serial=S]`, or `vol=POOL/NAME` instead of path.
    pub disks: Vec<String>,
    /// `--network default` (one NIC each; `none` for none).
    pub networks: Vec<String>,
    pub rng: bool,
    /// `--cap-add sys_nice`: real-time vCPU threads.
    pub cap_add: Vec<String>,
    /// `--cloud-init user-data=PATH[,meta-data=PATH]...` (virt-install).
    pub cloud_init: Option<String>,
}

fn bytes(flag: &'static str, text: &str) -> Result<u64, RunSpecError> {
    size::parse_bytes(text).map_err(|source| RunSpecError::Size { flag, source })
}

impl RunSpec {
    /// The definition these flags describe; `--memory` without
    /// `--guest-memory` sizes both the RAM and the limit.
    pub fn into_definition(self) -> Result<DomainDef, RunSpecError> {
        let limit = self
            .memory
            .as_deref()
            .map(|m| bytes("memory", m))
            .transpose()?;
        let guest = match self.guest_memory.as_deref() {
            Some(g) => Some(bytes("guest-memory", g)?),
            None => limit,
        };
        let swap = self
            .memory_swap
            .as_deref()
            .map(|s| {
                size::parse_memory_swap(s).map_err(|source| RunSpecError::Size {
                    flag: "memory-swap",
                    source,
                })
            })
            .transpose()?;
        if swap.is_some() && limit.is_none() {
            return Err(RunSpecError::Invalid {
                flag: "memory-swap",
                reason: "needs --memory too (as in Docker)".into(),
            });
        }
        let cpus = self
            .cpus
            .as_deref()
            .map(|c| {
                size::parse_cpus(c).map_err(|source| RunSpecError::Size {
                    flag: "cpus",
                    source,
                })?;
                c.parse::<f64>().map_err(|e| RunSpecError::Invalid {
                    flag: "cpus",
                    reason: e.to_string(),
                })
            })
            .transpose()?;
        let name = self.name.unwrap_or_else(generated_name);
        check_name(&name).map_err(|reason| RunSpecError::Invalid {
            flag: "name",
            reason,
        })?;
        let kernel = std::path::absolute(&self.kernel).map_err(|e| RunSpecError::Invalid {
            flag: "kernel",
            reason: e.to_string(),
        })?;
        let initrd = self
            .initrd
            .map(|i| {
                std::path::absolute(i).map_err(|e| RunSpecError::Invalid {
                    flag: "initrd",
                    reason: e.to_string(),
                })
            })
            .transpose()?;
        let mut disks = self
            .disks
            .iter()
            .map(|spec| parse_disk(spec))
            .collect::<Result<Vec<_>, _>>()?;
        let mut host_limits = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        let flags = [
            ("device-read-bps", self.device_read_bps),
            ("device-write-bps", self.device_write_bps),
            ("device-read-iops", self.device_read_iops),
            ("device-write-iops", self.device_write_iops),
        ];
        for (slot, (flag, specs)) in host_limits.iter_mut().zip(flags) {
            for spec in specs {
                if !set_disk_limit(&mut disks, flag, &spec)? {
                    slot.push(spec);
                }
            }
        }
        let [device_read_bps, device_write_bps, device_read_iops, device_write_iops] = host_limits;
        let nics = self
            .networks
            .iter()
            .filter(|n| n.as_str() != "none")
            .map(|n| Nic {
                network: Some(n.clone()),
                ..Nic::default()
            })
            .collect();
        let mut vcpu_sched = None;
        for cap in &self.cap_add {
            match cap.to_ascii_lowercase().trim_start_matches("cap_") {
                "sys_nice" => vcpu_sched = Some("fifo:1".to_owned()),
                _ => {
                    return Err(RunSpecError::Invalid {
                        flag: "cap-add",
                        reason: format!(
                        "{cap:?}: only sys_nice means something for a VM (real-time vCPU threads)"
                    ),
                    })
                }
            }
        }
        let cloud_init = self
            .cloud_init
            .as_deref()
            .map(crate::cloudinit::parse_flag)
            .transpose()
            .map_err(|reason| RunSpecError::Invalid {
                flag: "cloud-init",
                reason,
            })?;
        Ok(DomainDef {
            name,
            cloud_init,
            memory: ByteSize(guest.unwrap_or(128 << 20)),
            max_memory: None,
            disks,
            nics,
            rng: self.rng,
            vcpus: self.vcpus.unwrap_or(1),
            kernel,
            initrd,
            cmdline: self.cmdline,
            cpu_profile: self.cpu_profile,
            resources: Resources {
                cpu_shares: self.cpu_shares,
                cpus,
                cpuset_cpus: self.cpuset_cpus,
                cpuset_mems: self.cpuset_mems,
                memory_limit: limit.map(|l| ByteSize(l + VMM_OVERHEAD)),
                memory_soft_limit: self
                    .memory_reservation
                    .as_deref()
                    .map(|r| bytes("memory-reservation", r))
                    .transpose()?
                    .map(ByteSize),
                memory_swap: swap.map(|s| SwapSetting(with_overhead(s))),
                pids_limit: self.pids_limit,
                device_read_bps,
                device_write_bps,
                device_read_iops,
                device_write_iops,
                vcpu_sched,
                ..Resources::default()
            },
        })
    }
}

/// `--disk path=FILE,format=qcow2,readonly=on,cache=none,serial=ID`, or
/// `vol=POOL/NAME` for a storage pool's volume.
fn parse_disk(spec: &str) -> Result<Disk, RunSpecError> {
    let bad = |reason: String| RunSpecError::Invalid {
        flag: "disk",
        reason: format!("{spec:?}: {reason}"),
    };
    let mut disk = Disk::default();
    let mut path = None;
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| bad(format!("{item:?}: expected KEY=VALUE")))?;
        match key {
            "path" | "file" => path = Some(value),
            "vol" | "volume" => disk.volume = Some(value.to_owned()),
            "format" => disk.format = Some(value.to_owned()),
            "readonly" => {
                disk.readonly = match value {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(bad(format!("readonly={value}: expected on or off"))),
                }
            }
            "cache" => disk.cache = Some(value.to_owned()),
            "serial" => disk.serial = Some(value.to_owned()),
            _ => {
                return Err(bad(format!(
                    "unknown key {key:?} (expected path, vol, format, readonly, cache, serial)"
                )))
            }
        }
    }
    match (path, &disk.volume) {
        (Some(_), Some(_)) => Err(bad("give path=FILE or vol=POOL/NAME, not both".into())),
        (None, None) => Err(bad("path=FILE (or vol=POOL/NAME) is missing".into())),
        (None, Some(_)) => Ok(disk),
        (Some(path), None) => {
            disk.path = std::path::absolute(path).map_err(|e| bad(e.to_string()))?;
            Ok(disk)
        }
    }
}

/// Puts `--device-read-bps vda:1mb` on guest disk vda; false when the
/// device is a host device (a cgroup throttle).
fn set_disk_limit(
    disks: &mut [Disk],
    flag: &'static str,
    spec: &str,
) -> Result<bool, RunSpecError> {
    let parsed = if flag.ends_with("bps") {
        size::parse_device_bps(spec)
    } else {
        size::parse_device_iops(spec)
    }
    .map_err(|source| RunSpecError::Size { flag, source })?;
    let Some(index) = disk_index(&parsed.device) else {
        return Ok(false);
    };
    let count = disks.len();
    let disk = disks.get_mut(index).ok_or_else(|| RunSpecError::Invalid {
        flag,
        reason: format!(
            "{}: no such disk (the domain has {count} --disk)",
            parsed.device
        ),
    })?;
    let t: &mut DiskThrottle = &mut disk.throttle;
    let slot = match flag {
        "device-read-bps" => &mut t.read_bps,
        "device-write-bps" => &mut t.write_bps,
        "device-read-iops" => &mut t.read_iops,
        _ => &mut t.write_iops,
    };
    *slot = Some(parsed.rate);
    Ok(true)
}

/// Docker's memory+swap total moves up with the memory limit, so the swap
/// allowance stays what the user asked for.
fn with_overhead(swap: MemorySwap) -> MemorySwap {
    match swap {
        MemorySwap::Limit(n) => MemorySwap::Limit(n + VMM_OVERHEAD),
        other => other,
    }
}

/// Docker-like generated names: `vm-` and 8 hex digits.
fn generated_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("vm-{:08x}", nanos ^ std::process::id().rotate_left(16))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunSpec {
        RunSpec {
            name: Some("t".into()),
            kernel: "/k".into(),
            ..RunSpec::default()
        }
    }

    #[test]
    fn memory_sets_ram_and_limit_with_overhead() {
        let def = RunSpec {
            memory: Some("512m".into()),
            ..spec()
        }
        .into_definition()
        .unwrap();
        assert_eq!(def.memory.0, 512 << 20);
        assert_eq!(
            def.resources.memory_limit.unwrap().0,
            (512 << 20) + VMM_OVERHEAD
        );
        assert_eq!(def.resources.memory_swap, None);
    }

    #[test]
    fn guest_memory_overcommits() {
        let def = RunSpec {
            memory: Some("128m".into()),
            guest_memory: Some("512m".into()),
            ..spec()
        }
        .into_definition()
        .unwrap();
        assert_eq!(def.memory.0, 512 << 20);
        assert_eq!(
            def.resources.memory_limit.unwrap().0,
            (128 << 20) + VMM_OVERHEAD
        );
    }

    #[test]
    fn memory_swap_follows_docker() {
        let def = RunSpec {
            memory: Some("128m".into()),
            memory_swap: Some("-1".into()),
            ..spec()
        }
        .into_definition()
        .unwrap();
        assert_eq!(
            def.resources.memory_swap,
            Some(SwapSetting(MemorySwap::Unlimited))
        );
        let def = RunSpec {
            memory: Some("128m".into()),
            memory_swap: Some("1g".into()),
            ..spec()
        }
        .into_definition()
        .unwrap();
        assert_eq!(
            def.resources.memory_swap,
            Some(SwapSetting(MemorySwap::Limit((1 << 30) + VMM_OVERHEAD)))
        );
        let err = RunSpec {
            memory_swap: Some("1g".into()),
            ..spec()
        }
        .into_definition()
        .unwrap_err();
        assert!(err.to_string().contains("--memory-swap"), "{err}");
    }

    #[test]
    fn disks_name_a_path_or_a_volume() {
        let disk = parse_disk("vol=default/web.qcow2,format=qcow2").unwrap();
        assert_eq!(disk.volume.as_deref(), Some("default/web.qcow2"));
        assert!(disk.path.as_os_str().is_empty());
        assert!(parse_disk("path=/a.img").unwrap().volume.is_none());
        let both = parse_disk("path=/a.img,vol=default/a").unwrap_err();
        assert!(both.to_string().contains("not both"), "{both}");
        let neither = parse_disk("format=raw").unwrap_err();
        assert!(neither.to_string().contains("is missing"), "{neither}");
    }

    #[test]
    fn bad_flags_name_the_flag() {
        let err = RunSpec {
            cpus: Some("lots".into()),
            ..spec()
        }
        .into_definition()
        .unwrap_err();
        assert!(err.to_string().starts_with("--cpus"), "{err}");
        let err = RunSpec {
            name: Some("../x".into()),
            ..spec()
        }
        .into_definition()
        .unwrap_err();
        assert!(err.to_string().starts_with("--name"), "{err}");
    }
}
