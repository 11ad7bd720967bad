//! Domain snapshots: an internal qcow2 snapshot of the same name in every
//! disk (written with the `diskimg` library, as `qemu-img snapshot -c`
//! would), plus metadata the daemon keeps in `snapshots/DOMAIN/NAME.toml`.
//! Only shut-off domains: the VMM cannot save a running guest's state yet.

use std::path::{Path, PathBuf};

use diskimg::image::{probe, Chain};
use diskimg::Format;
use serde::{Deserialize, Serialize};

use crate::config::{check_name, write_atomic, DomainDef};
use crate::devices::disk_target;
use crate::error::ManagerError;
use crate::manager::{remove_if_exists, unix_now, Manager};

/// What the daemon records about one snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    /// The domain's state when it was taken (virsh's snapshot state).
    pub state: String,
    /// The disks that hold it, in vda, vdb, ... order.
    pub disks: Vec<PathBuf>,
}

impl Manager {
    fn snapshot_dir(&self, domain: &str) -> PathBuf {
        self.paths().state_dir.join("snapshots").join(domain)
    }

    fn snapshot_file(&self, domain: &str, name: &str) -> PathBuf {
        self.snapshot_dir(domain).join(format!("{name}.toml"))
    }

    /// The definition of a shut-off domain, or a refusal naming `action`.
    fn offline_def(&self, domain: &str, action: &'static str) -> Result<DomainDef, ManagerError> {
        self.with(domain, |d| {
            if d.state.is_active() {
                return Err(ManagerError::InvalidState {
                    domain: domain.to_owned(),
                    state: d.state,
                    action,
                    hint: " (the VMM cannot save a running guest's state yet: shut it down first)",
                });
            }
            Ok(d.def.clone())
        })
    }

    /// snapshot-list: oldest first.
    pub fn snapshots(&self, domain: &str) -> Result<Vec<SnapshotInfo>, ManagerError> {
        self.with(domain, |_| Ok(()))?;
        let dir = self.snapshot_dir(domain);
        let mut list = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(list);
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|source| ManagerError::Io {
                path: path.clone(),
                source,
            })?;
            match toml::from_str::<SnapshotInfo>(&text) {
                Ok(info) => list.push(info),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "snapshot metadata skipped")
                }
            }
        }
        list.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
        Ok(list)
    }

    fn snapshot(&self, domain: &str, name: &str) -> Result<SnapshotInfo, ManagerError> {
        self.snapshots(domain)?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| ManagerError::Invalid {
                domain: domain.to_owned(),
                field: "snapshot",
                reason: format!("{name:?}: no such snapshot"),
            })
    }

    /// snapshot-create-as: the same internal snapshot in every disk; on a
    /// failure the disks done so far lose it again.
    pub async fn snapshot_create(
        &self,
        domain: &str,
        name: &str,
        description: Option<String>,
    ) -> Result<SnapshotInfo, ManagerError> {
        let _guard = self.lifecycle().await;
        let def = self.offline_def(domain, "take a snapshot")?;
        check_name(name).map_err(|reason| ManagerError::Invalid {
            domain: domain.to_owned(),
            field: "snapshot",
            reason,
        })?;
        if self.snapshot_file(domain, name).exists() {
            return Err(ManagerError::Invalid {
                domain: domain.to_owned(),
                field: "snapshot",
                reason: format!("{name:?}: a snapshot of that name exists"),
            });
        }
        let disks = snapshot_disks(&def)?;
        for (i, path) in disks.iter().enumerate() {
            if let Err(e) = open_qcow2(domain, i, path).and_then(|q| {
                q.snapshot_create(name)
                    .map_err(|e| disk_error(domain, i, path, e))
            }) {
                for (j, done) in disks[..i].iter().enumerate() {
                    if let Err(undo) = open_qcow2(domain, j, done).and_then(|q| {
                        q.snapshot_delete(name)
                            .map_err(|e| disk_error(domain, j, done, e))
                    }) {
                        tracing::warn!(error = %undo, "cannot take back a partial snapshot");
                    }
                }
                return Err(e);
            }
        }
        let info = SnapshotInfo {
            name: name.to_owned(),
            description,
            created_at: unix_now(),
            state: "shutoff".into(),
            disks,
        };
        let text = toml::to_string(&info).map_err(|e| ManagerError::Invalid {
            domain: domain.to_owned(),
            field: "snapshot",
            reason: e.to_string(),
        })?;
        write_atomic(&self.snapshot_file(domain, name), text.as_bytes())?;
        tracing::info!(domain, snapshot = name, "snapshot taken");
        Ok(info)
    }

    /// snapshot-revert: every disk back to the snapshot; all disks are
    /// checked for it before any changes.
    pub async fn snapshot_revert(&self, domain: &str, name: &str) -> Result<(), ManagerError> {
        let _guard = self.lifecycle().await;
        self.offline_def(domain, "revert to a snapshot")?;
        let info = self.snapshot(domain, name)?;
        let mut images = Vec::new();
        for (i, path) in info.disks.iter().enumerate() {
            let q = open_qcow2(domain, i, path)?;
            let has = q
                .snapshots()
                .map_err(|e| disk_error(domain, i, path, e))?
                .iter()
                .any(|s| s.name == name);
            if !has {
                return Err(ManagerError::Invalid {
                    domain: domain.to_owned(),
                    field: "snapshot",
                    reason: format!(
                        "{name:?}: {} ({}) no longer holds it; nothing was reverted",
                        disk_target(i),
                        path.display()
                    ),
                });
            }
            images.push(q);
        }
        for (i, q) in images.iter().enumerate() {
            q.snapshot_apply(name)
                .map_err(|e| disk_error(domain, i, &info.disks[i], e))?;
        }
        tracing::info!(domain, snapshot = name, "reverted");
        Ok(())
    }

    /// snapshot-delete: out of every disk that still has it, then the
    /// metadata.
    pub async fn snapshot_delete(&self, domain: &str, name: &str) -> Result<(), ManagerError> {
        let _guard = self.lifecycle().await;
        self.offline_def(domain, "delete a snapshot")?;
        let info = self.snapshot(domain, name)?;
        for (i, path) in info.disks.iter().enumerate() {
            let q = open_qcow2(domain, i, path)?;
            let has = q
                .snapshots()
                .map_err(|e| disk_error(domain, i, path, e))?
                .iter()
                .any(|s| s.name == name);
            if has {
                q.snapshot_delete(name)
                    .map_err(|e| disk_error(domain, i, path, e))?;
            }
        }
        remove_if_exists(&self.snapshot_file(domain, name));
        tracing::info!(domain, snapshot = name, "snapshot deleted");
        Ok(())
    }

    /// Whether a domain has snapshot metadata (undefine needs
    /// --snapshots-metadata then).
    pub(crate) fn has_snapshots(&self, domain: &str) -> bool {
        self.snapshots(domain).is_ok_and(|s| !s.is_empty())
    }

    /// Forgets a domain's snapshot metadata (the disks keep the snapshots).
    pub(crate) fn forget_snapshots(&self, domain: &str) {
        crate::manager::remove_dir(&self.snapshot_dir(domain));
    }
}

/// The disks a snapshot goes into: all, and all must be writable qcow2.
fn snapshot_disks(def: &DomainDef) -> Result<Vec<PathBuf>, ManagerError> {
    let domain = &def.name;
    if def.disks.is_empty() {
        return Err(ManagerError::Invalid {
            domain: domain.clone(),
            field: "disk",
            reason: "the domain has no disks to snapshot".into(),
        });
    }
    for (i, disk) in def.disks.iter().enumerate() {
        let format = probe(&disk.path).map_err(|e| disk_error(domain, i, &disk.path, e))?;
        if format != Format::Qcow2 || disk.readonly {
            return Err(ManagerError::Invalid {
                domain: domain.clone(),
                field: "disk",
                reason: format!(
                    "{} ({}): internal snapshots need a writable qcow2 image",
                    disk_target(i),
                    disk.path.display()
                ),
            });
        }
    }
    Ok(def.disks.iter().map(|d| d.path.clone()).collect())
}

fn open_qcow2(
    domain: &str,
    index: usize,
    path: &Path,
) -> Result<diskimg::qcow2::Qcow2, ManagerError> {
    Chain::without_backing()
        .open_qcow2(path, false)
        .map_err(|e| disk_error(domain, index, path, e))
}

fn disk_error(domain: &str, index: usize, path: &Path, e: diskimg::Error) -> ManagerError {
    ManagerError::Invalid {
        domain: domain.to_owned(),
        field: "disk",
        reason: format!("{} ({}): {e}", disk_target(index), path.display()),
    }
}
