//! Live and persistent tuning: schedinfo, memtune and vcpupin, with
//! virsh's `--live` / `--config` choice (neither: live when running,
//! otherwise the definition).

use host::cgroup::DomainCgroup;
use serde::{Deserialize, Serialize};

use crate::config::{ByteSize, DomainDef, Resources};
use crate::error::ManagerError;
use crate::manager::{Live, Manager};
use crate::tune::{self, MemTune, SchedInfo, TuneError};

/// Where a change goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Modify {
    #[serde(default)]
    pub live: bool,
    #[serde(default)]
    pub config: bool,
}

/// One vCPU's pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuPin {
    pub vcpu: u32,
    pub cpulist: String,
}

/// setvcpus, setmem and setmaxmem: the vCPU count and memory sizes (bytes)
/// a domain boots with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sizing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory: Option<u64>,
}

impl Manager {
    /// Changes the definition's vCPUs or memory. The VMM has neither CPU
    /// hotplug nor a balloon, so a live change is refused.
    pub fn set_sizing(
        &self,
        name: &str,
        change: &Sizing,
        modify: Modify,
    ) -> Result<Sizing, ManagerError> {
        let (live, config) = self.targets(name, modify, "resize")?;
        if live.is_some() {
            return Err(ManagerError::Invalid {
                domain: name.to_owned(),
                field: "live",
                reason: "the VMM cannot change a running guest's vCPUs or memory (no CPU hotplug, no balloon yet); use --config, it applies at the next start".into(),
            });
        }
        let Some(mut def) = config else {
            return Err(ManagerError::Invalid {
                domain: name.to_owned(),
                field: "config",
                reason: "nothing to change".into(),
            });
        };
        if let Some(max) = change.max_memory {
            def.max_memory = Some(ByteSize(max));
            // virsh lowers the current size with the maximum.
            def.memory = ByteSize(def.memory.0.min(max));
        }
        if let Some(memory) = change.memory {
            def.memory = ByteSize(memory);
        }
        if let Some(vcpus) = change.vcpus {
            def.vcpus = vcpus;
            if let Some(pinned) = def
                .resources
                .vcpupin
                .keys()
                .find(|k| k.parse::<u32>().is_ok_and(|v| v >= vcpus))
            {
                return Err(ManagerError::Invalid {
                    domain: name.to_owned(),
                    field: "vcpus",
                    reason: format!("{vcpus}: vCPU {pinned} has a vcpupin entry; unpin it first"),
                });
            }
        }
        self.save_definition(&def)?;
        let sizing = Sizing {
            vcpus: Some(def.vcpus),
            memory: Some(def.memory.0),
            max_memory: Some(def.max_memory.map_or(def.memory.0, |m| m.0)),
        };
        self.with(name, |d| {
            d.def = def;
            Ok(())
        })?;
        Ok(sizing)
    }

    pub(crate) fn targets(
        &self,
        name: &str,
        modify: Modify,
        action: &'static str,
    ) -> Result<(Option<Live>, Option<DomainDef>), ManagerError> {
        self.with(name, |d| {
            let active = d.live.is_some();
            let (live, config) = match (modify.live, modify.config) {
                (false, false) => (active, !active),
                flags => flags,
            };
            if live && !active {
                return Err(ManagerError::InvalidState {
                    domain: name.to_owned(),
                    state: d.state,
                    action,
                    hint: " --live (it is not running)",
                });
            }
            if config && !d.persistent {
                return Err(ManagerError::Invalid {
                    domain: name.to_owned(),
                    field: "config",
                    reason: "a transient domain has no definition to change".into(),
                });
            }
            Ok((
                d.live.clone().filter(|_| live),
                config.then(|| d.def.clone()),
            ))
        })
    }

    /// Applies `change` to the live domain and/or its definition.
    pub(crate) fn tune(
        &self,
        name: &str,
        modify: Modify,
        action: &'static str,
        change: impl Fn(&mut Resources) -> Result<(), TuneError>,
        apply: impl FnOnce(&DomainCgroup, &DomainDef) -> Result<(), TuneError>,
    ) -> Result<(), ManagerError> {
        let tune_err = |source| ManagerError::Tune {
            domain: name.to_owned(),
            source,
        };
        let (live, config) = self.targets(name, modify, action)?;
        // Check the definition side first, so a bad value changes nothing.
        let config = match config {
            Some(mut def) => {
                change(&mut def.resources).map_err(tune_err)?;
                def.validate()?;
                Some(def)
            }
            None => None,
        };
        if let Some(mut live) = live {
            let Some(cg) = live.cgroup.clone() else {
                return Err(ManagerError::NoCgroups {
                    domain: name.to_owned(),
                    what: action,
                });
            };
            change(&mut live.record.def.resources).map_err(tune_err)?;
            apply(&cg, &live.record.def).map_err(tune_err)?;
            // The record keeps the live settings for a restarted daemon.
            live.record.save(&live.run_dir)?;
            self.with(name, |d| {
                if let Some(l) = d.live.as_mut().filter(|l| l.record.pid == live.record.pid) {
                    l.record.def = live.record.def.clone();
                }
                Ok(())
            })?;
        }
        if let Some(def) = config {
            self.save_definition(&def)?;
            self.with(name, |d| {
                d.def = def;
                Ok(())
            })?;
        }
        Ok(())
    }

    pub fn schedinfo(&self, name: &str) -> Result<SchedInfo, ManagerError> {
        let (live, def) = self.with(name, |d| Ok((d.live.clone(), d.def.clone())))?;
        match live.and_then(|l| l.cgroup) {
            Some(cg) => tune::read_schedinfo(&cg).map_err(|source| ManagerError::Tune {
                domain: name.to_owned(),
                source,
            }),
            None => Ok(tune::config_schedinfo(&def.resources)),
        }
    }

    pub fn set_schedinfo(
        &self,
        name: &str,
        change: &SchedInfo,
        modify: Modify,
    ) -> Result<SchedInfo, ManagerError> {
        self.tune(
            name,
            modify,
            "schedinfo",
            |r| tune::merge_schedinfo(r, change),
            |cg, def| tune::apply_sched_live(cg, def.vcpus, &def.resources),
        )?;
        self.schedinfo(name)
    }

    pub fn memtune(&self, name: &str) -> Result<MemTune, ManagerError> {
        let (live, def) = self.with(name, |d| Ok((d.live.clone(), d.def.clone())))?;
        match live.and_then(|l| l.cgroup) {
            Some(cg) => tune::read_memtune(&cg).map_err(|source| ManagerError::Tune {
                domain: name.to_owned(),
                source,
            }),
            None => Ok(tune::config_memtune(&def.resources)),
        }
    }

    pub fn set_memtune(
        &self,
        name: &str,
        change: &MemTune,
        modify: Modify,
    ) -> Result<MemTune, ManagerError> {
        self.tune(
            name,
            modify,
            "memtune",
            |r| tune::merge_memtune(r, change),
            |cg, def| tune::apply_memory_live(cg, &def.resources),
        )?;
        self.memtune(name)
    }

    /// The CPUs each vCPU may use ("" where the definition does not pin it).
    pub fn vcpupin(&self, name: &str) -> Result<Vec<VcpuPin>, ManagerError> {
        let (live, def) = self.with(name, |d| Ok((d.live.clone(), d.def.clone())))?;
        let lists = match live.and_then(|l| l.cgroup) {
            Some(cg) => {
                tune::read_vcpupin(&cg, def.vcpus).map_err(|source| ManagerError::Tune {
                    domain: name.to_owned(),
                    source,
                })?
            }
            None => (0..def.vcpus)
                .map(|v| {
                    def.resources
                        .vcpupin
                        .get(&v.to_string())
                        .cloned()
                        .unwrap_or_default()
                })
                .collect(),
        };
        Ok(lists
            .into_iter()
            .enumerate()
            .map(|(vcpu, cpulist)| VcpuPin {
                vcpu: vcpu as u32,
                cpulist,
            })
            .collect())
    }

    pub fn set_vcpupin(
        &self,
        name: &str,
        pin: &VcpuPin,
        modify: Modify,
    ) -> Result<Vec<VcpuPin>, ManagerError> {
        let vcpus = self.with(name, |d| {
            Ok(d.live.as_ref().map_or(&d.def, |l| &l.record.def).vcpus)
        })?;
        if pin.vcpu >= vcpus {
            return Err(ManagerError::Invalid {
                domain: name.to_owned(),
                field: "vcpu",
                reason: format!("{}: the domain has {vcpus} vCPUs", pin.vcpu),
            });
        }
        self.tune(
            name,
            modify,
            "vcpupin",
            |r| {
                r.vcpupin.insert(pin.vcpu.to_string(), pin.cpulist.clone());
                Ok(())
            },
            |cg, _| tune::pin_live(cg, pin.vcpu, &pin.cpulist),
        )?;
        self.vcpupin(name)
    }
}
