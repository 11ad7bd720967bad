//! A domain's devices as its definition writes them (`[[disk]]`, `[[nic]]`,
//! `rng`), checked, and turned into `oxvirt vmm` flags.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A guest disk: `[[disk]]` in the definition, `vda`, `vdb`, ... in the
/// guest and in the verbs, `disk0`, `disk1`, ... on the VMM's socket.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// An image file (raw or qcow2) or a host block device; for a disk
    /// with `volume`, the daemon fills it in from the pool.
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub path: PathBuf,
    /// A storage pool's volume, `POOL/NAME` (see `oxvirt vol-list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// raw or qcow2; the VMM probes the image when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub readonly: bool,
    /// none, writeback, writethrough or unsafe (QEMU's meanings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// What the guest reads with VIRTIO_BLK_T_GET_ID (up to 20 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// Rate limits: `throttle = { read_bps = 1048576 }`.
    #[serde(default, skip_serializing_if = "DiskThrottle::is_unlimited")]
    pub throttle: DiskThrottle,
}

/// A disk's rate limits (blkdeviotune, `--device-read-bps vda:1mb`);
/// unset or 0 is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskThrottle {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_iops: Option<u64>,
}

impl DiskThrottle {
    pub fn is_unlimited(&self) -> bool {
        self.qemu_fields().iter().all(|(_, v)| *v == 0)
    }

    /// The limits as QEMU's `block_set_io_throttle` names them (0: none).
    pub fn qemu_fields(&self) -> [(&'static str, u64); 6] {
        let v = |x: Option<u64>| x.unwrap_or(0);
        [
            ("bps", v(self.total_bps)),
            ("bps_rd", v(self.read_bps)),
            ("bps_wr", v(self.write_bps)),
            ("iops", v(self.total_iops)),
            ("iops_rd", v(self.read_iops)),
            ("iops_wr", v(self.write_iops)),
        ]
    }

    /// The VMM's `--disk` keys for the set limits.
    fn vmm_keys(&self) -> Vec<String> {
        [
            ("bps", self.total_bps),
            ("read_bps", self.read_bps),
            ("write_bps", self.write_bps),
            ("iops", self.total_iops),
            ("read_iops", self.read_iops),
            ("write_iops", self.write_iops),
        ]
        .into_iter()
        .filter_map(|(key, v)| v.filter(|&v| v > 0).map(|v| format!("{key}={v}")))
        .collect()
    }
}

/// A network interface on one of the daemon's networks: `[[nic]]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// The network it joins (`default` when unset; see `net-list`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// 52:54:00:xx:xx:xx derived from the domain name when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Bytes per second each way (0 or unset: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps: Option<u64>,
    /// Packets per second each way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pps: Option<u64>,
}

pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

fn is_empty_path(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// The guest's name for disk `index`: vda, vdb, ..., vdz, vdaa, ...
pub fn disk_target(index: usize) -> String {
    let mut suffix = Vec::new();
    let mut n = index;
    loop {
        suffix.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    suffix.reverse();
    format!("vd{}", String::from_utf8_lossy(&suffix))
}

/// The index of a guest disk name (`vda` -> 0), where it is one.
pub fn disk_index(target: &str) -> Option<usize> {
    let letters = target.strip_prefix("vd")?;
    if letters.is_empty() || letters.len() > 3 || !letters.bytes().all(|b| b.is_ascii_lowercase()) {
        return None;
    }
    let mut n = 0usize;
    for b in letters.bytes() {
        n = n * 26 + usize::from(b - b'a') + 1;
    }
    Some(n - 1)
}

/// The VMM's device id of disk `index`.
pub fn disk_id(index: usize) -> String {
    format!("disk{index}")
}

/// The VMM's device id of NIC `index`.
pub fn nic_id(index: usize) -> String {
    format!("net{index}")
}

/// Errors in a device definition: the field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceProblem {
    pub field: &'static str,
    pub reason: String,
}

fn problem(field: &'static str, reason: impl Into<String>) -> DeviceProblem {
    DeviceProblem {
        field,
        reason: reason.into(),
    }
}

/// Values the VMM's `key=value,...` flag syntax cannot carry.
fn check_flag_value(field: &'static str, value: &str) -> Result<(), DeviceProblem> {
    if value.contains([',', '=']) || value.chars().any(char::is_control) {
        return Err(problem(
            field,
            format!("{value:?}: must not contain ',', '=' or control characters"),
        ));
    }
    Ok(())
}

impl Disk {
    /// Checks the disk; `index` names it in errors.
    pub fn validate(&self) -> Result<(), DeviceProblem> {
        if is_empty_path(&self.path) {
            return Err(problem(
                "disk.path",
                "missing: give path (an image file or block device) or volume (POOL/NAME)",
            ));
        }
        let path = self.path.to_string_lossy();
        check_flag_value("disk.path", &path)?;
        if !self.path.is_absolute() {
            return Err(problem(
                "disk.path",
                format!("{path}: must be an absolute path"),
            ));
        }
        match std::fs::metadata(&self.path) {
            Ok(m) if m.is_file() || m.file_type().is_block_device() => {}
            Ok(_) => {
                return Err(problem(
                    "disk.path",
                    format!("{path}: neither an image file nor a block device"),
                ))
            }
            Err(e) => return Err(problem("disk.path", format!("{path}: {e}"))),
        }
        if let Some(format) = &self.format {
            if format != "raw" && format != "qcow2" {
                return Err(problem(
                    "disk.format",
                    format!("{format:?}: expected raw or qcow2"),
                ));
            }
        }
        if let Some(cache) = &self.cache {
            if !["none", "writeback", "writethrough", "unsafe"].contains(&cache.as_str()) {
                return Err(problem(
                    "disk.cache",
                    format!("{cache:?}: expected none, writeback, writethrough or unsafe"),
                ));
            }
        }
        if let Some(serial) = &self.serial {
            check_flag_value("disk.serial", serial)?;
            if serial.len() > 20 {
                return Err(problem(
                    "disk.serial",
                    format!("{serial:?}: at most 20 bytes (virtio-blk's ID)"),
                ));
            }
        }
        Ok(())
    }

    /// A host block device rather than an image file.
    pub fn is_block_device(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| m.file_type().is_block_device())
    }

    /// The value of the VMM's `--disk` flag.
    pub fn vmm_flag(&self, index: usize) -> String {
        let mut parts = vec![format!("path={}", self.path.display())];
        if let Some(format) = &self.format {
            parts.push(format!("format={format}"));
        }
        if self.readonly {
            parts.push("readonly=on".into());
        }
        if let Some(cache) = &self.cache {
            parts.push(format!("cache={cache}"));
        }
        if let Some(serial) = &self.serial {
            parts.push(format!("serial={serial}"));
        }
        parts.push(format!("id={}", disk_id(index)));
        parts.extend(self.throttle.vmm_keys());
        parts.join(",")
    }
}

impl Nic {
    pub fn validate(&self) -> Result<(), DeviceProblem> {
        if let Some(network) = &self.network {
            // Whether it is defined and active is checked at start.
            crate::netdef::check_name(network).map_err(|reason| problem("nic.network", reason))?;
        }
        if let Some(mac) = &self.mac {
            parse_mac(mac).map_err(|reason| problem("nic.mac", format!("{mac:?}: {reason}")))?;
        }
        Ok(())
    }

    /// The MAC address: the one set, or one derived from the domain name
    /// and the NIC's index (stable across starts), in QEMU's 52:54:00 range.
    pub fn mac_for(&self, domain: &str, index: usize) -> String {
        if let Some(mac) = &self.mac {
            return mac.to_ascii_lowercase();
        }
        // FNV-1a: stable across builds, unlike std's hasher.
        let mut hash: u32 = 0x811c_9dc5;
        for b in domain.bytes().chain(index.to_le_bytes()) {
            hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        let [a, b, c, _] = hash.to_be_bytes();
        format!("52:54:00:{a:02x}:{b:02x}:{c:02x}")
    }

    /// The value of the VMM's `--net` flag for a tap the daemon made.
    pub fn vmm_flag(&self, domain: &str, index: usize, tap: &str) -> String {
        let mut parts = vec![
            format!("tap={tap}"),
            format!("mac={}", self.mac_for(domain, index)),
            format!("id={}", nic_id(index)),
        ];
        for (key, v) in [("bps", self.bps), ("pps", self.pps)] {
            if let Some(v) = v.filter(|&v| v > 0) {
                parts.push(format!("{key}={v}"));
            }
        }
        parts.join(",")
    }
}

/// Checks a MAC address `aa:bb:cc:dd:ee:ff` (unicast).
pub fn parse_mac(text: &str) -> Result<[u8; 6], &'static str> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts
            .next()
            .ok_or("expected six hex bytes separated by ':'")?;
        if part.len() != 2 {
            return Err("expected six hex bytes separated by ':'");
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| "not a hex byte")?;
    }
    if parts.next().is_some() {
        return Err("expected six hex bytes separated by ':'");
    }
    if mac[0] & 1 == 1 {
        return Err("a multicast address cannot be a NIC's address");
    }
    Ok(mac)
}

/// The disk a verb names: `vda`, or its path.
pub fn find_disk<'a>(disks: &'a [Disk], name: &str) -> Option<(usize, &'a Disk)> {
    if let Some(i) = disk_index(name) {
        return disks.get(i).map(|d| (i, d));
    }
    disks
        .iter()
        .enumerate()
        .find(|(_, d)| d.path == Path::new(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_names_map_both_ways() {
        for (i, name) in [
            (0, "vda"),
            (1, "vdb"),
            (25, "vdz"),
            (26, "vdaa"),
            (27, "vdab"),
        ] {
            assert_eq!(disk_target(i), name);
            assert_eq!(disk_index(name), Some(i));
        }
        for bad in ["sda", "vd", "vdA", "vd1", "vdabcd"] {
            assert_eq!(disk_index(bad), None, "{bad}");
        }
    }

    #[test]
    fn disk_flag_carries_every_setting() {
        let disk = Disk {
            path: "/img/a.qcow2".into(),
            volume: None,
            format: Some("qcow2".into()),
            readonly: true,
            cache: Some("none".into()),
            serial: Some("root".into()),
            throttle: DiskThrottle {
                read_bps: Some(1 << 20),
                write_iops: Some(100),
                total_iops: Some(0),
                ..DiskThrottle::default()
            },
        };
        assert_eq!(
            disk.vmm_flag(1),
            "path=/img/a.qcow2,format=qcow2,readonly=on,cache=none,serial=root,id=disk1,read_bps=1048576,write_iops=100"
        );
    }

    #[test]
    fn hostile_disk_values_are_refused() {
        let disk = |path: &str| Disk {
            path: path.into(),
            ..Disk::default()
        };
        assert_eq!(
            disk("/tmp/a,readonly=off").validate().unwrap_err().field,
            "disk.path"
        );
        assert_eq!(
            disk("relative.img").validate().unwrap_err().field,
            "disk.path"
        );
        assert_eq!(
            disk("/nonexistent/x.img").validate().unwrap_err().field,
            "disk.path"
        );
        assert_eq!(disk("/tmp").validate().unwrap_err().field, "disk.path");
        let unset = disk("").validate().unwrap_err();
        assert!(unset.reason.contains("volume (POOL/NAME)"), "{unset:?}");
        let mut d = disk("/proc/self/exe");
        d.format = Some("vmdk".into());
        assert_eq!(d.validate().unwrap_err().field, "disk.format");
    }

    #[test]
    fn macs_are_checked_and_derived_stably() {
        assert!(parse_mac("52:54:00:12:34:56").is_ok());
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "zz:54:00:12:34:56",
            "01:00:5e:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        let nic = Nic::default();
        let a = nic.mac_for("web", 0);
        assert_eq!(a, nic.mac_for("web", 0));
        assert_ne!(a, nic.mac_for("web", 1));
        assert!(a.starts_with("52:54:00:"));
        assert!(parse_mac(&a).is_ok());
        assert_eq!(
            nic.vmm_flag("web", 0, "oxvnet3"),
            format!("tap=oxvnet3,mac={a},id=net0")
        );
    }
}
