//! `--disk` and `--net` settings: `key=value,...` lists on the command line
//! or tables in a config file, validated here into [`DiskConfig`] and
//! [`NicConfig`] (one parser for both spellings).

use std::collections::BTreeMap;
use std::path::PathBuf;

use devices::rate_limiter::LimiterConfig;
use devices::virtio::block::{BlockConfig, CacheMode};
use devices::virtio::net::{MacAddr, NetConfig};
use diskimg::Format;
use serde::Deserialize;
use serde_json::Value;

/// A device setting as given: `path=a.img,readonly=on` or a file table.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DeviceSetting {
    Text(String),
    Table(BTreeMap<String, Value>),
}

/// What is wrong with one `--disk` or `--net` setting.
#[derive(Debug, thiserror::Error)]
#[error("{kind} {text:?}: {problem}")]
pub struct DeviceConfigError {
    /// `--disk` or `--net`.
    pub kind: &'static str,
    /// The setting as given.
    pub text: String,
    pub problem: String,
}

/// One disk of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Name in `query-block` and `block_set_io_throttle` (`disk0`, ...).
    pub id: String,
    pub path: PathBuf,
    /// Probed from the image when not given.
    pub format: Option<Format>,
    pub block: BlockConfig,
}

/// One NIC of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    /// Name in `query-net` and `net_set_throttle` (`net0`, ...).
    pub id: String,
    pub tap: String,
    pub net: NetConfig,
}

/// The settings' keys and values, with where they came from for errors.
struct Options {
    kind: &'static str,
    text: String,
    values: BTreeMap<String, String>,
}

impl Options {
    fn parse(kind: &'static str, setting: &DeviceSetting) -> Result<Self, DeviceConfigError> {
        let (text, values) = match setting {
            DeviceSetting::Text(text) => (text.clone(), split_options(kind, text)?),
            DeviceSetting::Table(table) => {
                let values = table
                    .iter()
                    .map(|(k, v)| (k.clone(), scalar_text(v)))
                    .collect();
                (serde_json::to_string(table).unwrap_or_default(), values)
            }
        };
        Ok(Options { kind, text, values })
    }

    fn error(&self, problem: impl Into<String>) -> DeviceConfigError {
        DeviceConfigError {
            kind: self.kind,
            text: self.text.clone(),
            problem: problem.into(),
        }
    }

    /// Takes a key's value; keys never taken are reported by [`Options::finish`].
    fn take(&mut self, key: &str) -> Option<String> {
        self.values.remove(key)
    }

    fn take_flag(&mut self, key: &str) -> Result<bool, DeviceConfigError> {
        match self.take(key).as_deref() {
            None | Some("off" | "false" | "no") => Ok(false),
            Some("on" | "true" | "yes") => Ok(true),
            Some(other) => Err(self.error(format!("{key}={other}: expected on or off"))),
        }
    }

    fn take_rate(&mut self, key: &str) -> Result<Option<u64>, DeviceConfigError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match parse_rate(&v) {
                Some(0) => Ok(None),
                Some(n) => Ok(Some(n)),
                None => Err(self.error(format!(
                    "{key}={v}: expected a number, optionally with k, m or g (1024-based)"
                ))),
            },
        }
    }

    fn finish(self) -> Result<(), DeviceConfigError> {
        match self.values.keys().next() {
            None => Ok(()),
            Some(key) => Err(self.error(format!("unknown option {key:?}"))),
        }
    }
}

fn split_options(
    kind: &'static str,
    text: &str,
) -> Result<BTreeMap<String, String>, DeviceConfigError> {
    let mut values = BTreeMap::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err(DeviceConfigError {
                kind,
                text: text.to_owned(),
                problem: format!("{part:?} is not key=value"),
            });
        };
        if values.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(DeviceConfigError {
                kind,
                text: text.to_owned(),
                problem: format!("{key} given twice"),
            });
        }
    }
    Ok(values)
}

/// A file value as the command line would spell it.
fn scalar_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "on".into(),
        Value::Bool(false) => "off".into(),
        other => other.to_string(),
    }
}

/// `1048576`, `1024k`, `1m`, `1mb`, `2G`: bytes (or operations) per second,
/// 1024-based as Docker's `--device-read-bps` reads them.
pub fn parse_rate(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (digits, shift) = match t.chars().last()? {
        'k' => (&t[..t.len() - 1], 10),
        'm' => (&t[..t.len() - 1], 20),
        'g' => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// Parses one `--disk`; `index` names it when no `id=` is given.
pub fn parse_disk(setting: &DeviceSetting, index: usize) -> Result<DiskConfig, DeviceConfigError> {
    let mut o = Options::parse("--disk", setting)?;
    let path = o.take("path").ok_or_else(|| o.error("path= is missing"))?;
    let format = match o.take("format") {
        None => None,
        Some(f) => Some(match f.as_str() {
            "raw" => Format::Raw,
            "qcow2" => Format::Qcow2,
            other => return Err(o.error(format!("format={other}: expected raw or qcow2"))),
        }),
    };
    let cache = match o.take("cache") {
        None => CacheMode::default(),
        Some(c) => c
            .parse()
            .map_err(|e: devices::virtio::block::BlockError| o.error(e.to_string()))?,
    };
    let serial = o.take("serial");
    if serial.as_ref().is_some_and(|s| s.len() > 20) {
        return Err(o.error("serial= is longer than 20 bytes"));
    }
    let id = o.take("id").unwrap_or_else(|| format!("disk{index}"));
    let read_only = o.take_flag("readonly")?;
    let bps = o.take_rate("bps")?;
    let iops = o.take_rate("iops")?;
    let read_bps = o.take_rate("read_bps")?.or(bps);
    let write_bps = o.take_rate("write_bps")?.or(bps);
    let read_iops = o.take_rate("read_iops")?.or(iops);
    let write_iops = o.take_rate("write_iops")?.or(iops);
    let burst = o.take_rate("burst")?.unwrap_or(0);
    o.finish()?;
    Ok(DiskConfig {
        id,
        path: path.into(),
        format,
        block: BlockConfig {
            serial,
            cache,
            read_only,
            read_limit: LimiterConfig::per_second(read_bps, read_iops, burst),
            write_limit: LimiterConfig::per_second(write_bps, write_iops, burst),
            ..BlockConfig::default()
        },
    })
}

/// QEMU's default MAC prefix; the last byte counts NICs from 0x56 as QEMU does.
fn default_mac(index: usize) -> MacAddr {
    MacAddr([
        0x52,
        0x54,
        0x00,
        0x12,
        0x34,
        0x56u8.wrapping_add(index as u8),
    ])
}

/// Parses one `--net`; `bps` and `pps` limit each direction.
pub fn parse_nic(setting: &DeviceSetting, index: usize) -> Result<NicConfig, DeviceConfigError> {
    let mut o = Options::parse("--net", setting)?;
    let tap = o.take("tap").ok_or_else(|| o.error("tap= is missing"))?;
    if tap.is_empty() || tap.len() > 15 || tap.contains('/') {
        return Err(o.error("tap= must be 1 to 15 bytes without '/'"));
    }
    let mac = match o.take("mac") {
        None => default_mac(index),
        Some(m) => m
            .parse()
            .map_err(|_| o.error(format!("mac={m}: expected six hex bytes separated by ':'")))?,
    };
    let id = o.take("id").unwrap_or_else(|| format!("net{index}"));
    let limit = LimiterConfig::per_second(o.take_rate("bps")?, o.take_rate("pps")?, 0);
    o.finish()?;
    let mut net = NetConfig::new(mac);
    net.rx_limit = limit;
    net.tx_limit = limit;
    Ok(NicConfig { id, tap, net })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> DeviceSetting {
        DeviceSetting::Text(s.into())
    }

    #[test]
    fn disk_options() {
        let d = parse_disk(
            &text("path=/a.qcow2,format=qcow2,readonly=on,cache=none,serial=ABC,bps=1m,write_iops=100,burst=4k"),
            2,
        )
        .unwrap();
        assert_eq!(d.id, "disk2");
        assert_eq!(d.format, Some(Format::Qcow2));
        assert!(d.block.read_only);
        assert_eq!(d.block.cache, CacheMode::None);
        assert_eq!(d.block.serial.as_deref(), Some("ABC"));
        let r = d.block.read_limit;
        assert_eq!(r.bandwidth.unwrap().rate_per_second(), 1 << 20);
        assert_eq!(r.bandwidth.unwrap().one_time_burst, 4096);
        assert!(r.ops.is_none());
        assert_eq!(d.block.write_limit.ops.unwrap().rate_per_second(), 100);
    }

    #[test]
    fn disk_errors_name_the_problem() {
        for (input, problem) in [
            ("format=raw", "path= is missing"),
            ("path=/a,format=vdi", "format=vdi"),
            ("path=/a,readonly=maybe", "readonly=maybe"),
            ("path=/a,bps=fast", "bps=fast"),
            ("path=/a,cache=direct", "direct"),
            ("path=/a,colour=red", "unknown option \"colour\""),
            ("path=/a,path=/b", "path given twice"),
            ("path=/a,serial=123456789012345678901", "longer than 20"),
            ("path", "not key=value"),
        ] {
            let e = parse_disk(&text(input), 0).unwrap_err().to_string();
            assert!(e.contains(problem) && e.contains("--disk"), "{input}: {e}");
        }
    }

    #[test]
    fn file_tables_read_like_options() {
        let table: BTreeMap<String, Value> = serde_json::from_str(
            r#"{"path": "/d.raw", "readonly": true, "iops": 50, "id": "root"}"#,
        )
        .unwrap();
        let d = parse_disk(&DeviceSetting::Table(table), 0).unwrap();
        assert_eq!((d.id.as_str(), d.block.read_only), ("root", true));
        assert_eq!(d.block.read_limit.ops.unwrap().rate_per_second(), 50);
    }

    #[test]
    fn nic_options() {
        let n = parse_nic(&text("tap=tap0,bps=10m"), 1).unwrap();
        assert_eq!(n.id, "net1");
        assert_eq!(n.net.mac.to_string(), "52:54:00:12:34:57");
        assert_eq!(n.net.rx_limit, n.net.tx_limit);
        let n = parse_nic(&text("tap=t,mac=02:00:00:00:00:01,id=wan,pps=1000"), 0).unwrap();
        assert_eq!(
            (n.id.as_str(), n.net.mac.to_string().as_str()),
            ("wan", "02:00:00:00:00:01")
        );
        assert!(parse_nic(&text("mac=02:00:00:00:00:01"), 0).is_err());
        assert!(parse_nic(&text("tap=a,mac=zz"), 0)
            .unwrap_err()
            .to_string()
            .contains("mac=zz"));
        assert!(parse_nic(&text("tap=0123456789abcdef"), 0).is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1048576"), Some(1 << 20));
        assert_eq!(parse_rate("1mb"), Some(1 << 20));
        assert_eq!(parse_rate("2G"), Some(2 << 30));
        assert_eq!(parse_rate("10k"), Some(10240));
        assert_eq!(parse_rate("x"), None);
    }
}
