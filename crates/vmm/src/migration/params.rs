//! Migration vocabulary with QEMU's names: states, capabilities,
//! parameters and the `query-migrate` answer.

use serde::{Deserialize, Serialize};

/// Errors of capability and parameter validation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamsError {
    #[error("parameter {name}: {value} is out of range ({range})")]
    OutOfRange {
        name: &'static str,
        value: u64,
        range: &'static str,
    },
    #[error("capabilities xbzrle and multifd cannot be enabled together (xbzrle keeps one page cache, multifd spreads pages over several channels)")]
    XbzrleWithMultifd,
}

/// Migration states as QEMU's `MigrationStatus` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MigrationStatus {
    #[default]
    None,
    Setup,
    Active,
    /// vCPUs stopped, the last pages and the device state are on their way.
    Device,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
}

impl MigrationStatus {
    /// Whether a migration in this state still runs (a new one may not start).
    pub fn is_running(self) -> bool {
        matches!(
            self,
            MigrationStatus::Setup
                | MigrationStatus::Active
                | MigrationStatus::Device
                | MigrationStatus::Cancelling
        )
    }

    /// QEMU's name of the state.
    pub fn name(self) -> &'static str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::Device => "device",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
        }
    }
}

/// `migrate-set-capabilities`: all off by default, as in QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Capabilities {
    pub xbzrle: bool,
    pub auto_converge: bool,
    pub events: bool,
    pub multifd: bool,
}

impl Capabilities {
    /// Rejects combinations the engine cannot run.
    pub fn validate(&self) -> Result<(), ParamsError> {
        if self.xbzrle && self.multifd {
            return Err(ParamsError::XbzrleWithMultifd);
        }
        Ok(())
    }
}

/// `migrate-set-parameters` / `query-migrate-parameters`, QEMU's names and
/// defaults. Bandwidth in bytes per second, downtime in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Parameters {
    pub max_bandwidth: u64,
    pub downtime_limit: u64,
    pub xbzrle_cache_size: u64,
    pub cpu_throttle_initial: u8,
    pub cpu_throttle_increment: u8,
    pub max_cpu_throttle: u8,
    pub multifd_channels: u8,
}

impl Default for Parameters {
    fn default() -> Self {
        Parameters {
            max_bandwidth: 128 << 20,
            downtime_limit: 300,
            xbzrle_cache_size: 64 << 20,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            max_cpu_throttle: 99,
            multifd_channels: 2,
        }
    }
}

/// QEMU's upper bound for downtime-limit (2000 s, in ms).
const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

fn check(name: &'static str, value: u64, ok: bool, range: &'static str) -> Result<(), ParamsError> {
    if ok {
        Ok(())
    } else {
        Err(ParamsError::OutOfRange { name, value, range })
    }
}

impl Parameters {
    /// Checks each parameter against QEMU's ranges.
    pub fn validate(&self) -> Result<(), ParamsError> {
        check(
            "max-bandwidth",
            self.max_bandwidth,
            self.max_bandwidth >= 1,
            "at least 1 byte/s",
        )?;
        check(
            "downtime-limit",
            self.downtime_limit,
            self.downtime_limit <= MAX_DOWNTIME_LIMIT_MS,
            "0 to 2000000 ms",
        )?;
        check(
            "xbzrle-cache-size",
            self.xbzrle_cache_size,
            self.xbzrle_cache_size >= crate::migration::PAGE_SIZE as u64,
            "at least one 4096-byte page",
        )?;
        let initial = u64::from(self.cpu_throttle_initial);
        check(
            "cpu-throttle-initial",
            initial,
            (1..=99).contains(&initial),
            "1 to 99",
        )?;
        let increment = u64::from(self.cpu_throttle_increment);
        check(
            "cpu-throttle-increment",
            increment,
            (1..=99).contains(&increment),
            "1 to 99",
        )?;
        let max = u64::from(self.max_cpu_throttle);
        check("max-cpu-throttle", max, (1..=99).contains(&max), "1 to 99")?;
        let channels = u64::from(self.multifd_channels);
        check(
            "multifd-channels",
            channels,
            (1..=255).contains(&channels),
            "1 to 255",
        )
    }
}

/// `query-migrate`'s `ram` member.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes of RAM sections put on the wire (headers included).
    pub transferred: u64,
    /// Bytes of dirty pages still to send.
    pub remaining: u64,
    pub total: u64,
    /// Zero pages sent as a flag only.
    pub duplicate: u64,
    /// Pages sent in full.
    pub normal: u64,
    pub normal_bytes: u64,
    /// Pages dirtied per second during the last pass.
    pub dirty_pages_rate: u64,
    /// Measured bandwidth in megabits per second.
    pub mbps: f64,
    pub dirty_sync_count: u64,
    pub pages_per_second: u64,
}

/// `query-migrate`'s `xbzrle-cache` member.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct XbzrleStats {
    pub cache_size: u64,
    /// Encoded bytes sent.
    pub bytes: u64,
    /// Pages sent XBZRLE-encoded.
    pub pages: u64,
    pub cache_miss: u64,
    pub cache_miss_rate: f64,
    /// Page bytes per encoded byte.
    pub encoding_rate: f64,
    /// Pages whose encoding would have exceeded a page (sent in full).
    pub overflow: u64,
}

/// The answer of `query-migrate`; times in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_time: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup_time: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_downtime: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_percentage: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ram: Option<RamStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xbzrle_cache: Option<XbzrleStats>,
    /// Why the migration failed (QEMU's `error-desc`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_desc: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_names_are_qemus() {
        let names: Vec<String> = [
            MigrationStatus::None,
            MigrationStatus::Setup,
            MigrationStatus::Active,
            MigrationStatus::Device,
            MigrationStatus::Completed,
            MigrationStatus::Failed,
            MigrationStatus::Cancelling,
            MigrationStatus::Cancelled,
        ]
        .iter()
        .map(|s| {
            let v = serde_json::to_value(s).unwrap();
            assert_eq!(v, json!(s.name()));
            s.name().to_string()
        })
        .collect();
        assert_eq!(
            names,
            [
                "none",
                "setup",
                "active",
                "device",
                "completed",
                "failed",
                "cancelling",
                "cancelled"
            ]
        );
    }

    #[test]
    fn parameter_defaults_and_names() {
        let v = serde_json::to_value(Parameters::default()).unwrap();
        assert_eq!(
            v,
            json!({"max-bandwidth": 134217728u64, "downtime-limit": 300, "xbzrle-cache-size": 67108864u64,
                   "cpu-throttle-initial": 20, "cpu-throttle-increment": 10, "max-cpu-throttle": 99,
                   "multifd-channels": 2})
        );
        assert_eq!(Parameters::default().validate(), Ok(()));
    }

    #[test]
    fn partial_parameters_keep_defaults_and_unknown_names_are_rejected() {
        let p: Parameters = serde_json::from_value(json!({"downtime-limit": 30})).unwrap();
        assert_eq!(p.downtime_limit, 30);
        assert_eq!(p.max_bandwidth, 128 << 20);
        let err = serde_json::from_value::<Parameters>(json!({"downtime": 30})).unwrap_err();
        assert!(err.to_string().contains("downtime"), "{err}");
        let c: Capabilities = serde_json::from_value(json!({"auto-converge": true})).unwrap();
        assert!(c.auto_converge && !c.xbzrle);
    }

    #[test]
    fn out_of_range_parameters_are_named() {
        let bad = Parameters {
            cpu_throttle_initial: 0,
            ..Parameters::default()
        };
        let err = bad.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "parameter cpu-throttle-initial: 0 is out of range (1 to 99)"
        );
        let bad = Parameters {
            downtime_limit: 2_000_001,
            ..Parameters::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("downtime-limit"));
        let bad = Parameters {
            multifd_channels: 0,
            ..Parameters::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("multifd-channels"));
        let both = Capabilities {
            xbzrle: true,
            multifd: true,
            ..Capabilities::default()
        };
        assert_eq!(both.validate(), Err(ParamsError::XbzrleWithMultifd));
    }

    #[test]
    fn info_field_names_match_query_migrate() {
        let info = MigrationInfo {
            status: MigrationStatus::Active,
            total_time: Some(1),
            setup_time: Some(2),
            expected_downtime: Some(3),
            downtime: Some(4),
            cpu_throttle_percentage: Some(20),
            ram: Some(RamStats::default()),
            xbzrle_cache: Some(XbzrleStats::default()),
            error_desc: None,
        };
        let v = serde_json::to_value(&info).unwrap();
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(
            keys(&v),
            [
                "cpu-throttle-percentage",
                "downtime",
                "expected-downtime",
                "ram",
                "setup-time",
                "status",
                "total-time",
                "xbzrle-cache"
            ]
        );
        assert_eq!(
            keys(&v["ram"]),
            [
                "dirty-pages-rate",
                "dirty-sync-count",
                "duplicate",
                "mbps",
                "normal",
                "normal-bytes",
                "pages-per-second",
                "remaining",
                "total",
                "transferred"
            ]
        );
        assert_eq!(
            keys(&v["xbzrle-cache"]),
            [
                "bytes",
                "cache-miss",
                "cache-miss-rate",
                "cache-size",
                "encoding-rate",
                "overflow",
                "pages"
            ]
        );
        let none = serde_json::to_value(MigrationInfo::default()).unwrap();
        assert_eq!(none, json!({"status": "none"}));
    }
}
