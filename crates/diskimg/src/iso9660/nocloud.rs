//! cloud-init NoCloud seeds: an ISO 9660 volume labelled `cidata` with
//! `user-data`, `meta-data` and optionally `network-config` and
//! `vendor-data` in its root, which cloud-init's NoCloud datasource finds
//! by label and reads (what `cloud-localds` makes with genisoimage).

use std::path::Path;

use super::{IsoError, IsoFile, IsoImage};

/// The label cloud-init looks for (it accepts `CIDATA` too).
pub const VOLUME_ID: &str = "cidata";
pub const USER_DATA: &str = "user-data";
pub const META_DATA: &str = "meta-data";
pub const NETWORK_CONFIG: &str = "network-config";
pub const VENDOR_DATA: &str = "vendor-data";
/// cloud-localds's instance id when no meta-data is given.
pub const DEFAULT_INSTANCE_ID: &str = "iid-local01";

/// Where each file of a seed comes from.
#[derive(Debug, Clone, Copy, Default)]
pub struct SeedSources<'a> {
    pub user_data: Option<&'a Path>,
    pub meta_data: Option<&'a Path>,
    pub network_config: Option<&'a Path>,
    pub vendor_data: Option<&'a Path>,
}

impl SeedSources<'_> {
    /// Reads the files; `meta-data` is `default_meta` where no file is
    /// named, and `user-data` empty (cloud-init then does nothing with it).
    pub fn read(&self, default_meta: Vec<u8>) -> Result<Vec<IsoFile>, IsoError> {
        let mut files = vec![
            match self.user_data {
                Some(path) => IsoFile::read(USER_DATA, path)?,
                None => IsoFile::new(USER_DATA, Vec::new()),
            },
            match self.meta_data {
                Some(path) => IsoFile::read(META_DATA, path)?,
                None => IsoFile::new(META_DATA, default_meta),
            },
        ];
        for (name, path) in [
            (NETWORK_CONFIG, self.network_config),
            (VENDOR_DATA, self.vendor_data),
        ] {
            if let Some(path) = path {
                files.push(IsoFile::read(name, path)?);
            }
        }
        Ok(files)
    }

    /// The newest modification time of the named files (seconds since the
    /// epoch), so that the same inputs give the same image bytes.
    pub fn newest_mtime(&self) -> i64 {
        [
            self.user_data,
            self.meta_data,
            self.network_config,
            self.vendor_data,
        ]
        .into_iter()
        .flatten()
        .filter_map(|p| std::fs::metadata(p).ok()?.modified().ok())
        .filter_map(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64)
        .max()
        .unwrap_or(0)
    }
}

/// The meta-data cloud-localds writes when given none: JSON with the
/// instance id and, when set, `local-hostname` and `dsmode`.
pub fn default_meta_data(
    instance_id: &str,
    hostname: Option<&str>,
    dsmode: Option<&str>,
) -> Vec<u8> {
    let entries: Vec<String> = [
        ("instance-id", Some(instance_id)),
        ("local-hostname", hostname),
        ("dsmode", dsmode),
    ]
    .into_iter()
    .filter_map(|(key, value)| {
        let value = value.filter(|v| !v.is_empty())?;
        Some(format!("\"{key}\": {}", serde_json::Value::from(value)))
    })
    .collect();
    format!("{{\n{}\n}}\n", entries.join(",\n")).into_bytes()
}

/// The seed image of `files`, recorded at `recorded` (Unix seconds).
pub fn seed_image(files: Vec<IsoFile>, recorded: i64) -> IsoImage {
    IsoImage {
        volume_id: VOLUME_ID.to_owned(),
        recorded,
        files,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_meta_data_is_cloud_localds_json() {
        assert_eq!(
            default_meta_data(DEFAULT_INSTANCE_ID, None, None),
            b"{\n\"instance-id\": \"iid-local01\"\n}\n"
        );
        assert_eq!(
            default_meta_data("i-1", Some("web"), Some("local")),
            b"{\n\"instance-id\": \"i-1\",\n\"local-hostname\": \"web\",\n\"dsmode\": \"local\"\n}\n"
        );
        let quoted = default_meta_data("i-1", Some("a\"b"), None);
        let parsed: serde_json::Value = serde_json::from_slice(&quoted).unwrap();
        assert_eq!(parsed["local-hostname"], "a\"b");
    }

    #[test]
    fn missing_and_odd_sources_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let sources = SeedSources {
            user_data: Some(&missing),
            ..SeedSources::default()
        };
        let err = sources.read(Vec::new()).unwrap_err().to_string();
        assert!(
            err.contains("nope") && err.contains("No such file"),
            "{err}"
        );
        let sources = SeedSources {
            user_data: Some(dir.path()),
            ..SeedSources::default()
        };
        let err = sources.read(Vec::new()).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
