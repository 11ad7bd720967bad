//! cloud-init NoCloud seeds for domains: `[cloud_init]` in a definition
//! (or `oxvirt run --cloud-init user-data=PATH`) names the files; each
//! start writes them into `STATE/cloud-init/NAME.iso` (ISO 9660, label
//! `cidata`, as cloud-localds makes it) and the VMM gets that image as a
//! read-only raw virtio disk after the domain's own disks. See
//! docs/cloud-init.md.

use std::path::{Path, PathBuf};

use diskimg::iso9660::nocloud::{self, SeedSources};
use diskimg::iso9660::IsoError;
use serde::{Deserialize, Serialize};

use crate::devices::DeviceProblem;

/// The VMM's device id and the disk's serial (the guest's
/// `/dev/disk/by-id/virtio-cidata`).
pub const SEED_ID: &str = "cidata";

/// Errors writing a domain's seed.
#[derive(Debug, thiserror::Error)]
pub enum CloudInitError {
    #[error("domain {domain:?}: cloud_init: {source}")]
    Seed {
        domain: String,
        #[source]
        source: IsoError,
    },
}

impl From<CloudInitError> for crate::ManagerError {
    fn from(e: CloudInitError) -> Self {
        let CloudInitError::Seed { domain, source } = e;
        crate::ManagerError::Invalid {
            domain,
            field: "cloud_init",
            reason: source.to_string(),
        }
    }
}

/// `[cloud_init]`: the files of the seed, as virt-install's
/// `--cloud-init user-data=...,meta-data=...,network-config=...` names them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudInit {
    /// `user-data` (`#cloud-config ...`); unset: an empty file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<PathBuf>,
    /// `meta-data`; unset: instance-id and local-hostname are the
    /// domain's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor_data: Option<PathBuf>,
}

impl CloudInit {
    fn fields(&self) -> [(&'static str, Option<&Path>); 4] {
        [
            ("cloud_init.user_data", self.user_data.as_deref()),
            ("cloud_init.meta_data", self.meta_data.as_deref()),
            ("cloud_init.network_config", self.network_config.as_deref()),
            ("cloud_init.vendor_data", self.vendor_data.as_deref()),
        ]
    }

    /// Each file named is absolute, a regular file, and within the size
    /// limit of a file in the seed.
    pub fn validate(&self) -> Result<(), DeviceProblem> {
        for (field, path) in self.fields() {
            let Some(path) = path else { continue };
            let bad = |reason: String| DeviceProblem {
                field,
                reason: format!("{}: {reason}", path.display()),
            };
            if !path.is_absolute() {
                return Err(bad("must be an absolute path".into()));
            }
            let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
            if !meta.is_file() {
                return Err(bad("not a regular file".into()));
            }
            if meta.len() > diskimg::iso9660::MAX_FILE_SIZE {
                return Err(bad(format!(
                    "{} bytes: more than the {}-byte limit of a seed file",
                    meta.len(),
                    diskimg::iso9660::MAX_FILE_SIZE
                )));
            }
        }
        Ok(())
    }

    fn sources(&self) -> SeedSources<'_> {
        SeedSources {
            user_data: self.user_data.as_deref(),
            meta_data: self.meta_data.as_deref(),
            network_config: self.network_config.as_deref(),
            vendor_data: self.vendor_data.as_deref(),
        }
    }
}

/// Where a domain's seed is written.
pub fn seed_path(state_dir: &Path, domain: &str) -> PathBuf {
    state_dir.join("cloud-init").join(format!("{domain}.iso"))
}

/// Writes the seed of a domain with `[cloud_init]` (replacing the last
/// one whole) and returns its path; `None` for a domain without. The
/// image's time is the newest input's, so the same files give the same
/// bytes (a migration's destination builds what the source has).
pub fn write_seed(
    state_dir: &Path,
    domain: &str,
    cloud_init: Option<&CloudInit>,
) -> Result<Option<PathBuf>, CloudInitError> {
    let Some(ci) = cloud_init else {
        return Ok(None);
    };
    let err = |source| CloudInitError::Seed {
        domain: domain.to_owned(),
        source,
    };
    let sources = ci.sources();
    let default_meta = nocloud::default_meta_data(domain, Some(domain), None);
    let files = sources.read(default_meta).map_err(err)?;
    let path = seed_path(state_dir, domain);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| {
            err(IsoError::Io {
                path: dir.to_owned(),
                source,
            })
        })?;
    }
    nocloud::seed_image(files, sources.newest_mtime())
        .write(&path)
        .map_err(err)?;
    tracing::debug!(domain, seed = %path.display(), "cloud-init seed written");
    Ok(Some(path))
}

/// The VMM's `--disk` value for the seed, the domain's disk `index`.
pub fn seed_disk_flag(seed: &Path) -> String {
    format!(
        "path={},format=raw,readonly=on,serial={SEED_ID},id={SEED_ID}",
        seed.display()
    )
}

/// Removes a domain's seed (undefine, or a transient domain's end).
pub fn remove_seed(state_dir: &Path, domain: &str) {
    let path = seed_path(state_dir, domain);
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::debug!(domain, "cloud-init seed removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(domain, seed = %path.display(), error = %e, "cannot remove the cloud-init seed")
        }
    }
}

/// `oxvirt run --cloud-init user-data=PATH[,meta-data=PATH]
/// [,network-config=PATH][,vendor-data=PATH]` (virt-install's keys);
/// relative paths are made absolute.
pub fn parse_flag(spec: &str) -> Result<CloudInit, String> {
    let mut ci = CloudInit::default();
    for item in spec.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("{spec:?}: {item:?}: expected KEY=PATH"))?;
        let slot = match key {
            "user-data" => &mut ci.user_data,
            "meta-data" => &mut ci.meta_data,
            "network-config" => &mut ci.network_config,
            "vendor-data" => &mut ci.vendor_data,
            _ => {
                return Err(format!(
                "{spec:?}: unknown key {key:?} (expected user-data, meta-data, network-config, vendor-data)"
            ))
            }
        };
        if slot.is_some() {
            return Err(format!("{spec:?}: {key} is given twice"));
        }
        if value.is_empty() {
            return Err(format!("{spec:?}: {key} needs a path"));
        }
        let path = std::path::absolute(value).map_err(|e| format!("{value}: {e}"))?;
        *slot = Some(path);
    }
    Ok(ci)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_takes_virt_install_keys() {
        let ci = parse_flag("user-data=/a/u,meta-data=/a/m,network-config=/a/n").unwrap();
        assert_eq!(ci.user_data.as_deref(), Some(Path::new("/a/u")));
        assert_eq!(ci.meta_data.as_deref(), Some(Path::new("/a/m")));
        assert_eq!(ci.network_config.as_deref(), Some(Path::new("/a/n")));
        assert!(parse_flag("user-data=rel")
            .unwrap()
            .user_data
            .unwrap()
            .is_absolute());
        for bad in [
            "user-data",
            "userdata=/a",
            "user-data=/a,user-data=/b",
            "user-data=",
            "root-password-generate=on",
        ] {
            assert!(parse_flag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn seeds_are_written_checked_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("user-data");
        std::fs::write(&user, "#cloud-config\n").unwrap();
        let ci = CloudInit {
            user_data: Some(user.clone()),
            ..CloudInit::default()
        };
        ci.validate().unwrap();
        let state = dir.path().join("state");
        let seed = write_seed(&state, "web", Some(&ci)).unwrap().unwrap();
        let first = std::fs::read(&seed).unwrap();
        write_seed(&state, "web", Some(&ci)).unwrap();
        assert_eq!(
            std::fs::read(&seed).unwrap(),
            first,
            "same inputs, same bytes"
        );
        assert_eq!(
            seed_disk_flag(&seed),
            format!(
                "path={},format=raw,readonly=on,serial=cidata,id=cidata",
                seed.display()
            )
        );
        remove_seed(&state, "web");
        assert!(!seed.exists());
        assert!(write_seed(&state, "web", None).unwrap().is_none());

        let missing = CloudInit {
            meta_data: Some(dir.path().join("gone")),
            ..CloudInit::default()
        };
        let problem = missing.validate().unwrap_err();
        assert_eq!(problem.field, "cloud_init.meta_data");
        assert!(problem.reason.contains("gone"), "{}", problem.reason);
        let err = write_seed(&state, "web", Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"web\"") && err.contains("gone"), "{err}");
        let folder = CloudInit {
            network_config: Some(dir.path().to_owned()),
            ..CloudInit::default()
        };
        assert_eq!(
            folder.validate().unwrap_err().field,
            "cloud_init.network_config"
        );
        let relative = CloudInit {
            user_data: Some("user-data".into()),
            ..CloudInit::default()
        };
        assert!(relative.validate().unwrap_err().reason.contains("absolute"));
    }
}
