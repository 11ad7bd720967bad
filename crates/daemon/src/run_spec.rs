//! `oxvirt run`'s Docker-style flags turned into a domain definition, with
//! Docker's meanings carried over to a VM.

use std::path::PathBuf;

use host::size::{self, MemorySwap, SizeError};

use crate::config::{check_name, ByteSize, DomainDef, Resources, SwapSetting};

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
        Ok(DomainDef {
            name,
            memory: ByteSize(guest.unwrap_or(128 << 20)),
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
                device_read_bps: self.device_read_bps,
                device_write_bps: self.device_write_bps,
                device_read_iops: self.device_read_iops,
                device_write_iops: self.device_write_iops,
                ..Resources::default()
            },
        })
    }
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
