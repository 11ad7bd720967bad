//! Disk and NIC I/O: blkdeviotune (a guest disk's rate limits: the VMM's
//! token buckets through `block_set_io_throttle`, and for a disk that is a
//! host block device also its blkio/io.max throttle), blkiotune (the
//! domain's block I/O weight and host-device throttles in its cgroup),
//! domblkstat (`query-blockstats`) and domifstat (`query-net`).

use std::path::Path;

use host::cgroup::{DeviceNumber, ThrottleKind};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::devices::{disk_id, disk_target, find_disk, nic_id, DiskThrottle};
use crate::error::ManagerError;
use crate::manager::{Live, Manager};
use crate::settings::Modify;
use crate::vmm_client::{self, VmmClientError};

/// One disk's counters, with virsh domblkstat's names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    pub disk: String,
    pub rd_req: u64,
    pub rd_bytes: u64,
    pub wr_req: u64,
    pub wr_bytes: u64,
    pub flush_operations: u64,
    pub rd_total_times: u64,
    pub wr_total_times: u64,
    pub flush_total_times: u64,
    pub errs: u64,
}

/// One NIC's counters, with virsh domifstat's names (the guest's view).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStats {
    pub interface: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errs: u64,
    pub rx_drop: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errs: u64,
    pub tx_drop: u64,
}

/// blkiotune: the weight and host-device throttles ("/dev/sda:N").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlkioTune {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_read_bps: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_write_bps: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_read_iops: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_write_iops: Vec<String>,
}

fn number(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Merges a blkdeviotune change (0 lifts a limit) into `current`.
pub fn merge_throttle(current: &mut DiskThrottle, change: &DiskThrottle) {
    let slots = [
        (&mut current.total_bps, change.total_bps),
        (&mut current.read_bps, change.read_bps),
        (&mut current.write_bps, change.write_bps),
        (&mut current.total_iops, change.total_iops),
        (&mut current.read_iops, change.read_iops),
        (&mut current.write_iops, change.write_iops),
    ];
    for (slot, value) in slots {
        if let Some(v) = value {
            *slot = (v > 0).then_some(v);
        }
    }
}

/// The cgroup throttles a block-device disk's limits map onto (the
/// per-direction ones; blkio has no combined limit).
fn cgroup_throttles(t: &DiskThrottle) -> [(ThrottleKind, Option<u64>); 4] {
    [
        (ThrottleKind::ReadBps, t.read_bps.or(t.total_bps)),
        (ThrottleKind::WriteBps, t.write_bps.or(t.total_bps)),
        (ThrottleKind::ReadIops, t.read_iops.or(t.total_iops)),
        (ThrottleKind::WriteIops, t.write_iops.or(t.total_iops)),
    ]
}

impl Manager {
    fn vmm_error(name: &str) -> impl Fn(VmmClientError) -> ManagerError + '_ {
        move |source| ManagerError::Vmm {
            domain: name.to_owned(),
            source,
        }
    }

    /// domblkstat: every disk, or the one named (vda or its path).
    pub async fn domblkstat(
        &self,
        name: &str,
        disk: Option<&str>,
    ) -> Result<Vec<BlockStats>, ManagerError> {
        let live = self.live(name, "read disk statistics")?;
        let wanted = match disk {
            Some(d) => Some(self.disk_of(name, &live, d)?.0),
            None => None,
        };
        let reply = vmm_client::execute(&live.api, "query-blockstats")
            .await
            .map_err(Self::vmm_error(name))?;
        let mut out = Vec::new();
        for (i, _) in live.record.def.disks.iter().enumerate() {
            if wanted.is_some_and(|w| w != i) {
                continue;
            }
            let id = disk_id(i);
            let Some(entry) = reply
                .as_array()
                .and_then(|a| a.iter().find(|e| e.get("device") == Some(&json!(id))))
            else {
                continue;
            };
            let s = entry.get("stats").cloned().unwrap_or_default();
            out.push(BlockStats {
                disk: disk_target(i),
                rd_req: number(&s, "rd_operations"),
                rd_bytes: number(&s, "rd_bytes"),
                wr_req: number(&s, "wr_operations"),
                wr_bytes: number(&s, "wr_bytes"),
                flush_operations: number(&s, "flush_operations"),
                rd_total_times: number(&s, "rd_total_time_ns"),
                wr_total_times: number(&s, "wr_total_time_ns"),
                flush_total_times: number(&s, "flush_total_time_ns"),
                errs: number(&s, "errors") + number(&s, "failed_rd_operations"),
            });
        }
        Ok(out)
    }

    /// domifstat: a NIC named by its tap, MAC or VMM id (net0).
    pub async fn domifstat(
        &self,
        name: &str,
        interface: &str,
    ) -> Result<InterfaceStats, ManagerError> {
        let live = self.live(name, "read interface statistics")?;
        let def = &live.record.def;
        let index = (0..def.nics.len()).find(|&i| {
            live.record.taps.get(i).is_some_and(|t| t == interface)
                || def.nics[i].mac_for(&def.name, i) == interface.to_ascii_lowercase()
                || nic_id(i) == interface
        });
        let Some(index) = index else {
            return Err(ManagerError::Invalid {
                domain: name.to_owned(),
                field: "interface",
                reason: format!(
                    "{interface:?}: no such interface (give its tap, e.g. {}, or its MAC)",
                    live.record.taps.first().map_or("oxvnet0", String::as_str)
                ),
            });
        };
        let reply = vmm_client::execute(&live.api, "query-net")
            .await
            .map_err(Self::vmm_error(name))?;
        let id = nic_id(index);
        let n = reply
            .as_array()
            .and_then(|a| a.iter().find(|e| e.get("name") == Some(&json!(id))))
            .cloned()
            .unwrap_or_default();
        Ok(InterfaceStats {
            interface: live.record.taps.get(index).cloned().unwrap_or(id),
            rx_bytes: number(&n, "rx_bytes"),
            rx_packets: number(&n, "rx_packets"),
            rx_errs: number(&n, "errors"),
            rx_drop: number(&n, "rx_dropped"),
            tx_bytes: number(&n, "tx_bytes"),
            tx_packets: number(&n, "tx_packets"),
            tx_errs: 0,
            tx_drop: number(&n, "tx_dropped"),
        })
    }

    fn disk_of(&self, name: &str, live: &Live, disk: &str) -> Result<(usize, bool), ManagerError> {
        find_disk(&live.record.def.disks, disk)
            .map(|(i, d)| (i, d.is_block_device()))
            .ok_or_else(|| self.no_disk(name, disk, live.record.def.disks.len()))
    }

    fn no_disk(&self, name: &str, disk: &str, count: usize) -> ManagerError {
        ManagerError::Invalid {
            domain: name.to_owned(),
            field: "disk",
            reason: format!("{disk:?}: no such disk (the domain has {count}: vda..)"),
        }
    }

    /// blkdeviotune: reads a disk's limits (`change` None) or changes them
    /// live (VMM rate limiter, plus the cgroup throttle of a block-device
    /// disk) and/or in the definition.
    pub async fn blkdeviotune(
        &self,
        name: &str,
        disk: &str,
        change: Option<&DiskThrottle>,
        modify: Modify,
    ) -> Result<DiskThrottle, ManagerError> {
        let (live, config) = self.targets(name, modify, "blkdeviotune")?;
        let Some(change) = change else {
            return match live {
                Some(live) => self.live_throttle(name, &live, disk).await,
                None => {
                    let def = config.unwrap_or(self.with(name, |d| Ok(d.def.clone()))?);
                    find_disk(&def.disks, disk)
                        .map(|(_, d)| d.throttle)
                        .ok_or_else(|| self.no_disk(name, disk, def.disks.len()))
                }
            };
        };
        // The definition side is checked first, so a refusal changes nothing.
        let config = match config {
            Some(mut def) => {
                let count = def.disks.len();
                let index = find_disk(&def.disks, disk)
                    .map(|(i, _)| i)
                    .ok_or_else(|| self.no_disk(name, disk, count))?;
                merge_throttle(&mut def.disks[index].throttle, change);
                def.validate()?;
                Some(def)
            }
            None => None,
        };
        let mut result = None;
        if let Some(mut live) = live {
            let (index, block_device) = self.disk_of(name, &live, disk)?;
            let throttle = &mut live.record.def.disks[index].throttle;
            merge_throttle(throttle, change);
            let throttle = *throttle;
            let mut args = json!({"device": disk_id(index)});
            for (key, value) in throttle.qemu_fields() {
                args[key] = json!(value);
            }
            vmm_client::execute_with(&live.api, "block_set_io_throttle", Some(args))
                .await
                .map_err(Self::vmm_error(name))?;
            if block_device {
                let path = live.record.def.disks[index].path.clone();
                self.set_device_throttles(name, &live, &path, &throttle)?;
            }
            self.keep_live_def(name, &live)?;
            result = Some(throttle);
        }
        if let Some(def) = config {
            let throttle = find_disk(&def.disks, disk).map(|(_, d)| d.throttle);
            self.save_definition(&def)?;
            self.with(name, |d| {
                d.def = def;
                Ok(())
            })?;
            result = result.or(throttle);
        }
        Ok(result.unwrap_or_default())
    }

    async fn live_throttle(
        &self,
        name: &str,
        live: &Live,
        disk: &str,
    ) -> Result<DiskThrottle, ManagerError> {
        let (index, _) = self.disk_of(name, live, disk)?;
        let reply = vmm_client::execute(&live.api, "query-block")
            .await
            .map_err(Self::vmm_error(name))?;
        let id = disk_id(index);
        let inserted = reply
            .as_array()
            .and_then(|a| a.iter().find(|e| e.get("device") == Some(&json!(id))))
            .and_then(|e| e.get("inserted"))
            .cloned()
            .unwrap_or_default();
        let get = |key| Some(number(&inserted, key)).filter(|&v| v > 0);
        Ok(DiskThrottle {
            total_bps: get("bps"),
            read_bps: get("bps_rd"),
            write_bps: get("bps_wr"),
            total_iops: get("iops"),
            read_iops: get("iops_rd"),
            write_iops: get("iops_wr"),
        })
    }

    fn set_device_throttles(
        &self,
        name: &str,
        live: &Live,
        device: &Path,
        throttle: &DiskThrottle,
    ) -> Result<(), ManagerError> {
        let Some(cg) = &live.cgroup else {
            return Err(ManagerError::NoCgroups {
                domain: name.to_owned(),
                what: "a block-device disk's throttle",
            });
        };
        let tune_err = |e: host::cgroup::CgroupError| ManagerError::Tune {
            domain: name.to_owned(),
            source: e.into(),
        };
        let number = DeviceNumber::of_block_device(device).map_err(tune_err)?;
        for (kind, limit) in cgroup_throttles(throttle) {
            cg.set_throttle(number, kind, limit).map_err(tune_err)?;
        }
        Ok(())
    }

    /// Keeps a live change in the record, for a restarted daemon.
    fn keep_live_def(&self, name: &str, live: &Live) -> Result<(), ManagerError> {
        live.record.save(&live.run_dir)?;
        self.with(name, |d| {
            if let Some(l) = d.live.as_mut().filter(|l| l.record.pid == live.record.pid) {
                l.record.def = live.record.def.clone();
            }
            Ok(())
        })
    }

    /// blkiotune: reads the weight and host-device throttles, or changes
    /// them (live in the cgroup and/or in the definition).
    pub fn blkiotune(
        &self,
        name: &str,
        change: Option<&BlkioTune>,
        modify: Modify,
    ) -> Result<BlkioTune, ManagerError> {
        if let Some(change) = change {
            self.tune(
                name,
                modify,
                "blkiotune",
                |r| {
                    if let Some(w) = change.weight {
                        r.blkio_weight = Some(w);
                    }
                    for (list, new) in [
                        (&mut r.device_read_bps, &change.device_read_bps),
                        (&mut r.device_write_bps, &change.device_write_bps),
                        (&mut r.device_read_iops, &change.device_read_iops),
                        (&mut r.device_write_iops, &change.device_write_iops),
                    ] {
                        merge_device_limits(list, new);
                    }
                    Ok(())
                },
                |cg, def| {
                    lift_device_limits(cg, change)?;
                    crate::tune::apply_blkio_live(cg, &def.resources)
                },
            )?;
        }
        let def = self.with(name, |d| {
            Ok(d.live.as_ref().map_or(&d.def, |l| &l.record.def).clone())
        })?;
        let r = &def.resources;
        Ok(BlkioTune {
            weight: r.blkio_weight,
            device_read_bps: r.device_read_bps.clone(),
            device_write_bps: r.device_write_bps.clone(),
            device_read_iops: r.device_read_iops.clone(),
            device_write_iops: r.device_write_iops.clone(),
        })
    }
}

/// Lifts the cgroup throttles a change sets to 0.
fn lift_device_limits(
    cg: &host::cgroup::DomainCgroup,
    change: &BlkioTune,
) -> Result<(), crate::tune::TuneError> {
    let lists = [
        (&change.device_read_bps, ThrottleKind::ReadBps),
        (&change.device_write_bps, ThrottleKind::WriteBps),
        (&change.device_read_iops, ThrottleKind::ReadIops),
        (&change.device_write_iops, ThrottleKind::WriteIops),
    ];
    for (list, kind) in lists {
        for entry in list {
            if let Some((device, "0")) = entry.rsplit_once(':') {
                let number = DeviceNumber::of_block_device(Path::new(device))?;
                cg.set_throttle(number, kind, None)?;
            }
        }
    }
    Ok(())
}

/// Replaces the entry for each device `new` names ("/dev/sda:N"; a rate
/// of 0 removes it), keeping the others.
fn merge_device_limits(list: &mut Vec<String>, new: &[String]) {
    for entry in new {
        let device = entry.rsplit_once(':').map_or(entry.as_str(), |(d, _)| d);
        list.retain(|e| e.rsplit_once(':').map_or(e.as_str(), |(d, _)| d) != device);
        let lifted = entry.rsplit_once(':').is_some_and(|(_, r)| r == "0");
        if !lifted {
            list.push(entry.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_changes_merge_and_zero_lifts() {
        let mut t = DiskThrottle {
            read_bps: Some(100),
            write_iops: Some(5),
            ..DiskThrottle::default()
        };
        merge_throttle(
            &mut t,
            &DiskThrottle {
                read_bps: Some(0),
                total_iops: Some(50),
                ..DiskThrottle::default()
            },
        );
        assert_eq!(
            t,
            DiskThrottle {
                total_iops: Some(50),
                write_iops: Some(5),
                ..DiskThrottle::default()
            }
        );
        assert_eq!(
            t.qemu_fields(),
            [
                ("bps", 0),
                ("bps_rd", 0),
                ("bps_wr", 0),
                ("iops", 50),
                ("iops_rd", 0),
                ("iops_wr", 5)
            ]
        );
    }

    #[test]
    fn block_device_limits_map_per_direction() {
        let t = DiskThrottle {
            total_bps: Some(1000),
            write_bps: Some(10),
            read_iops: Some(7),
            ..DiskThrottle::default()
        };
        assert_eq!(
            cgroup_throttles(&t),
            [
                (ThrottleKind::ReadBps, Some(1000)),
                (ThrottleKind::WriteBps, Some(10)),
                (ThrottleKind::ReadIops, Some(7)),
                (ThrottleKind::WriteIops, None),
            ]
        );
    }

    #[test]
    fn device_limits_replace_per_device() {
        let mut list = vec!["/dev/sda:100".to_owned(), "/dev/sdb:5".to_owned()];
        merge_device_limits(&mut list, &["/dev/sda:200".into(), "/dev/sdb:0".into()]);
        assert_eq!(list, vec!["/dev/sda:200".to_owned()]);
    }
}
