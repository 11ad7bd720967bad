//! Docker's syntax for sizes, CPU counts and device rates (`--memory 512m`,
//! `--cpus 1.5`, `--memory-swap -1`, `--device-read-bps vda:1mb`), parsed
//! the way Docker's go-units does.

use thiserror::Error;

/// The default CFS period Docker uses for `--cpus` (100 ms).
pub const DEFAULT_CFS_PERIOD_US: u64 = 100_000;
/// The smallest CFS quota the kernel accepts (1 ms).
pub const MIN_CFS_QUOTA_US: u64 = 1_000;

#[derive(Debug, Error, PartialEq)]
pub enum SizeError {
    #[error("invalid size {input:?}: {reason}")]
    Size { input: String, reason: &'static str },
    #[error("invalid CPU count {input:?}: {reason}")]
    Cpus { input: String, reason: &'static str },
    #[error("invalid device limit {input:?}: {reason}")]
    DeviceLimit { input: String, reason: String },
}

/// `--device-read-bps vda:1mb` or `--device-write-iops /dev/sda:100`: a
/// device (a guest disk name or a host device path) and a rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRate {
    pub device: String,
    /// Bytes or operations per second.
    pub rate: u64,
}

/// `--memory-swap`: unset (twice the memory), `-1` (unlimited) or a size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemorySwap {
    #[default]
    Unset,
    Unlimited,
    /// Memory plus swap, in bytes.
    Limit(u64),
}

/// `--cpus` as a CFS quota over a period, both in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuQuota {
    pub quota_us: u64,
    pub period_us: u64,
}

/// Parses a size like `512m`, `1g`, `1.5GiB`, `100kb` or `4096` (bytes).
/// Units are binary (k = 1024), as in Docker's `RAMInBytes`.
pub fn parse_bytes(input: &str) -> Result<u64, SizeError> {
    let err = |reason| SizeError::Size {
        input: input.to_owned(),
        reason,
    };
    let s = input.trim();
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(err(
            "expected a number, optionally followed by a unit (k, m, g, t, p)",
        ));
    }
    let value: f64 = number.parse().map_err(|_| err("malformed number"))?;
    let multiplier = unit_multiplier(unit.trim_start()).ok_or_else(|| {
        err("unknown unit (expected b, k, m, g, t or p, optionally followed by i and/or b)")
    })?;
    let bytes = value * multiplier as f64;
    if bytes >= u64::MAX as f64 {
        return Err(err("too large"));
    }
    Ok(bytes as u64)
}

fn unit_multiplier(unit: &str) -> Option<u64> {
    let lower = unit.to_ascii_lowercase();
    let mut chars = lower.chars();
    let power = match chars.next() {
        None => return Some(1),
        Some('b') if chars.as_str().is_empty() => return Some(1),
        Some('k') => 1,
        Some('m') => 2,
        Some('g') => 3,
        Some('t') => 4,
        Some('p') => 5,
        Some(_) => return None,
    };
    match chars.as_str() {
        "" | "b" | "i" | "ib" => Some(1u64 << (10 * power)),
        _ => None,
    }
}

/// Parses `--memory-swap`: `-1` is unlimited, anything else a size.
pub fn parse_memory_swap(input: &str) -> Result<MemorySwap, SizeError> {
    if input.trim() == "-1" {
        return Ok(MemorySwap::Unlimited);
    }
    parse_bytes(input).map(MemorySwap::Limit)
}

/// Parses `--cpus 1.5` into a quota over Docker's 100 ms period.
pub fn parse_cpus(input: &str) -> Result<CpuQuota, SizeError> {
    let err = |reason| SizeError::Cpus {
        input: input.to_owned(),
        reason,
    };
    let cpus: f64 = input
        .trim()
        .parse()
        .map_err(|_| err("expected a decimal number such as 1.5"))?;
    if !cpus.is_finite() || cpus <= 0.0 {
        return Err(err("must be greater than 0"));
    }
    let quota = (cpus * DEFAULT_CFS_PERIOD_US as f64).round();
    if quota < MIN_CFS_QUOTA_US as f64 {
        return Err(err("must be at least 0.01"));
    }
    if quota > u32::MAX as f64 {
        return Err(err("too large"));
    }
    Ok(CpuQuota {
        quota_us: quota as u64,
        period_us: DEFAULT_CFS_PERIOD_US,
    })
}

/// Parses `DEVICE:RATE` with a size as the rate (`--device-read-bps`).
pub fn parse_device_bps(input: &str) -> Result<DeviceRate, SizeError> {
    parse_device_rate(input, |rate| parse_bytes(rate).map_err(|e| e.to_string()))
}

/// Parses `DEVICE:RATE` with a plain count as the rate (`--device-read-iops`).
pub fn parse_device_iops(input: &str) -> Result<DeviceRate, SizeError> {
    parse_device_rate(input, |rate| {
        rate.parse()
            .map_err(|_| format!("{rate:?} is not a whole number of operations per second"))
    })
}

fn parse_device_rate(
    input: &str,
    rate: impl Fn(&str) -> Result<u64, String>,
) -> Result<DeviceRate, SizeError> {
    let err = |reason: String| SizeError::DeviceLimit {
        input: input.to_owned(),
        reason,
    };
    let (device, value) = input
        .rsplit_once(':')
        .ok_or_else(|| err("expected DEVICE:RATE".to_owned()))?;
    if device.is_empty() {
        return Err(err("the device is empty".to_owned()));
    }
    let rate = rate(value).map_err(err)?;
    if rate == 0 {
        return Err(err("the rate must be greater than 0".to_owned()));
    }
    Ok(DeviceRate {
        device: device.to_owned(),
        rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("512m"), Ok(512 << 20));
        assert_eq!(parse_bytes("1g"), Ok(1 << 30));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("100kb"), Ok(100 << 10));
        assert_eq!(parse_bytes("20 MB"), Ok(20 << 20));
        assert_eq!(parse_bytes("7b"), Ok(7));
    }

    #[test]
    fn bad_sizes_name_the_input() {
        for bad in ["", "m", "12x", "1..2g", "1gbb", "-5m", "1e9"] {
            let err = parse_bytes(bad).expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert!(parse_bytes("99999999999p").is_err());
    }

    #[test]
    fn memory_swap_minus_one_is_unlimited() {
        assert_eq!(parse_memory_swap("-1"), Ok(MemorySwap::Unlimited));
        assert_eq!(parse_memory_swap("1g"), Ok(MemorySwap::Limit(1 << 30)));
        assert!(parse_memory_swap("-2").is_err());
    }

    #[test]
    fn device_rates() {
        let bps = parse_device_bps("vda:1mb").unwrap();
        assert_eq!((bps.device.as_str(), bps.rate), ("vda", 1 << 20));
        let iops = parse_device_iops("/dev/sda:100").unwrap();
        assert_eq!((iops.device.as_str(), iops.rate), ("/dev/sda", 100));
        for bad in ["vda", ":1mb", "vda:", "vda:0", "vda:fast"] {
            let err = parse_device_bps(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert!(parse_device_iops("vda:1.5").is_err());
    }

    #[test]
    fn cpus_become_a_quota_over_100ms() {
        let q = parse_cpus("1.5").unwrap();
        assert_eq!((q.quota_us, q.period_us), (150_000, 100_000));
        assert_eq!(parse_cpus(".1").unwrap().quota_us, 10_000);
        for bad in ["0", "-1", "abc", "0.001", "NaN", "inf"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
    }
}
