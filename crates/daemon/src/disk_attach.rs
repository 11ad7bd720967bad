//! attach-disk and detach-disk: a domain's disks changed in its definition
//! (`--config`, applied at the next start). The VMM's virtio-mmio devices
//! are fixed when it starts (no hotplug), so a live change is refused with
//! an error that says so.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::routing::{delete, post};
use axum::Router;
use hyper::Method;
use serde::{Deserialize, Serialize};

use crate::api::{body, modify, ok, ApiResult};
use crate::client::{seg, Client, ClientError};
use crate::devices::{disk_target, find_disk, Disk};
use crate::error::ManagerError;
use crate::manager::Manager;
use crate::settings::Modify;

/// attach-disk's request: the disk (a `path` or a `volume`), and the guest
/// name it is to get (the next free one, `vdb` after `vda`, when unset).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttachDisk {
    pub disk: Disk,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// One disk of a definition, as attach-disk and detach-disk report them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskTarget {
    pub target: String,
    pub path: std::path::PathBuf,
    pub volume: Option<String>,
}

impl Manager {
    /// Adds a disk to the definition; returns the definition's disks.
    pub async fn attach_disk(
        &self,
        name: &str,
        request: &AttachDisk,
        modify: Modify,
    ) -> Result<Vec<DiskTarget>, ManagerError> {
        let _guard = self.lifecycle().await;
        let mut def = self.definition_to_change(name, modify, "attach a disk")?;
        let invalid = |field, reason| ManagerError::Invalid {
            domain: name.to_owned(),
            field,
            reason,
        };
        let next = disk_target(def.disks.len());
        if let Some(target) = request.target.as_deref().filter(|t| **t != next) {
            return Err(invalid(
                "target",
                format!("{target}: disks are vda, vdb, ... in the order of their [[disk]] entries, so the next one is {next}"),
            ));
        }
        def.disks.push(request.disk.clone());
        self.pools().resolve_disks(name, &mut def.disks)?;
        let added = def.disks.last().map(|d| d.path.clone()).unwrap_or_default();
        if let Some((i, _)) = find_disk(&def.disks[..def.disks.len() - 1], &added.to_string_lossy())
        {
            return Err(invalid(
                "disk.path",
                format!(
                    "{}: the domain's {} already",
                    added.display(),
                    disk_target(i)
                ),
            ));
        }
        self.replace_definition(def)
    }

    /// Removes a disk (`vdb` or its path) from the definition; the disks
    /// after it move up one name (vdc becomes vdb).
    pub async fn detach_disk(
        &self,
        name: &str,
        disk: &str,
        modify: Modify,
    ) -> Result<Vec<DiskTarget>, ManagerError> {
        let _guard = self.lifecycle().await;
        let mut def = self.definition_to_change(name, modify, "detach a disk")?;
        let Some((index, _)) = find_disk(&def.disks, disk) else {
            return Err(ManagerError::Invalid {
                domain: name.to_owned(),
                field: "disk",
                reason: format!(
                    "{disk:?}: no such disk (the domain has {})",
                    target_names(&def.disks).join(", ")
                ),
            });
        };
        def.disks.remove(index);
        self.replace_definition(def)
    }

    /// The definition a disk change goes to; a live change is refused.
    fn definition_to_change(
        &self,
        name: &str,
        modify: Modify,
        action: &'static str,
    ) -> Result<crate::config::DomainDef, ManagerError> {
        let (live, config) = self.targets(name, modify, action)?;
        if live.is_some() {
            return Err(ManagerError::Invalid {
                domain: name.to_owned(),
                field: "live",
                reason: format!("cannot {action} to a running guest: the VMM has no disk hotplug (its virtio-mmio devices are fixed when it starts); use --config, the change applies at the next start"),
            });
        }
        config.ok_or_else(|| ManagerError::Invalid {
            domain: name.to_owned(),
            field: "config",
            reason: "nothing to change".into(),
        })
    }

    fn replace_definition(
        &self,
        def: crate::config::DomainDef,
    ) -> Result<Vec<DiskTarget>, ManagerError> {
        self.save_definition(&def)?;
        let disks = def
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| DiskTarget {
                target: disk_target(i),
                path: d.path.clone(),
                volume: d.volume.clone(),
            })
            .collect();
        let name = def.name.clone();
        self.with(&name, |d| {
            d.def = def;
            Ok(())
        })?;
        Ok(disks)
    }
}

fn target_names(disks: &[Disk]) -> Vec<String> {
    match disks.len() {
        0 => vec!["no disks".into()],
        n => (0..n).map(disk_target).collect(),
    }
}

/// `POST /v1/domains/{name}/disks`, `DELETE /v1/domains/{name}/disks/{disk}`.
pub(crate) fn routes() -> Router<Manager> {
    Router::new()
        .route("/v1/domains/{name}/disks", post(attach))
        .route("/v1/domains/{name}/disks/{disk}", delete(detach))
}

async fn attach(
    State(m): State<Manager>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    bytes: Bytes,
) -> ApiResult {
    let request: AttachDisk = body(&bytes)?;
    ok(m.attach_disk(&name, &request, modify(&q)?).await?)
}

async fn detach(
    State(m): State<Manager>,
    Path((name, disk)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    ok(m.detach_disk(&name, &disk, modify(&q)?).await?)
}

/// attach-disk's and detach-disk's calls.
impl Client {
    pub async fn attach_disk(
        &self,
        name: &str,
        request: &AttachDisk,
        modify: Modify,
    ) -> Result<Vec<DiskTarget>, ClientError> {
        let body = serde_json::to_value(request).map_err(|e| ClientError::Decode {
            status: 0,
            body: e.to_string(),
        })?;
        let path = format!(
            "/v1/domains/{}/disks?live={}&config={}",
            seg(name),
            modify.live,
            modify.config
        );
        self.call(Method::POST, &path, Some(body)).await
    }

    pub async fn detach_disk(
        &self,
        name: &str,
        disk: &str,
        modify: Modify,
    ) -> Result<Vec<DiskTarget>, ClientError> {
        let path = format!(
            "/v1/domains/{}/disks/{}?live={}&config={}",
            seg(name),
            seg(disk),
            modify.live,
            modify.config
        );
        self.call(Method::DELETE, &path, None).await
    }
}
