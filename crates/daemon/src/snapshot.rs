//! Domain snapshots: an internal qcow2 snapshot of the same name in every
//! disk (written with the `diskimg` library, as `qemu-img snapshot -c`
//! would), plus metadata the daemon keeps in `snapshots/DOMAIN/NAME.toml`.
//!
//! A running (or paused) domain's snapshot also holds its memory: the VMM
//! writes the guest's state to `snapshots/DOMAIN/memory/NAME.state`
//! (`migrate` to `file:`, which pauses the guest) and quits, which flushes
//! and closes its disks; the disks get their internal snapshots while
//! nobody has them open (a running VMM caches qcow2 metadata, so changing
//! the image under it would corrupt it); then a new VMM carries on from
//! that state file. Disks and memory are of the same instant; the guest
//! sees a pause.

use std::path::{Path, PathBuf};

use diskimg::image::{probe, Chain};
use diskimg::Format;
use serde::{Deserialize, Serialize};

use crate::config::{check_name, write_atomic, DomainDef};
use crate::devices::disk_target;
use crate::domain::{Reason, State};
use crate::error::ManagerError;
use crate::manager::{remove_if_exists, unix_now, Manager, StopRequest};
use crate::migrate::MigrationJob;
use crate::save::definition_beside;

/// How long writing a snapshot's memory may take.
const STATE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

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
    /// The guest's saved state (a snapshot of a running or paused domain),
    /// with the definition it ran with beside it (`FILE.domain.toml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<PathBuf>,
}

/// How a running domain's VMM is taken down for a change to its disks and
/// brought back: where its state goes, and what it runs with.
struct Pause {
    state_file: PathBuf,
    def: DomainDef,
    paused: bool,
    reason: Reason,
}

impl Manager {
    fn snapshot_dir(&self, domain: &str) -> PathBuf {
        self.paths().state_dir.join("snapshots").join(domain)
    }

    fn snapshot_file(&self, domain: &str, name: &str) -> PathBuf {
        self.snapshot_dir(domain).join(format!("{name}.toml"))
    }

    /// Apart from the metadata, which the listing reads.
    fn memory_file(&self, domain: &str, name: &str) -> PathBuf {
        self.snapshot_dir(domain)
            .join("memory")
            .join(format!("{name}.state"))
    }

    /// The definition a domain runs with (or would start with), and
    /// whether it is active.
    fn current_def(&self, domain: &str) -> Result<(DomainDef, State), ManagerError> {
        self.with(domain, |d| {
            let def = d.live.as_ref().map_or(&d.def, |l| &l.record.def);
            Ok((def.clone(), d.state))
        })
    }

    /// Saves a running domain's state to `state_file` and stops its VMM,
    /// so its disks are closed; [`Manager::resume_from`] brings it back.
    async fn pause_to(&self, domain: &str, state_file: PathBuf) -> Result<Pause, ManagerError> {
        let (def, state) = self.current_def(domain)?;
        let reason = self.with(domain, |d| Ok(d.reason.clone()))?;
        let live = self.live(domain, "take a snapshot")?;
        if let Some(dir) = state_file.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ManagerError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        write_atomic(&definition_beside(&state_file), def.to_toml()?.as_bytes())?;
        let uri = format!("file:{}", state_file.display());
        let job = MigrationJob {
            uri: &uri,
            action: "save the guest's memory",
            stop: StopRequest::Save,
            timeout: STATE_TIMEOUT,
        };
        let failed = |why| ManagerError::Invalid {
            domain: domain.to_owned(),
            field: "snapshot",
            reason: format!(
                "saving the memory to {}: {why}; the guest runs on",
                state_file.display()
            ),
        };
        if let Err(e) = self.migrate_then_stop(domain, &live, job, failed).await {
            remove_snapshot_files(&state_file);
            return Err(e);
        }
        // A transient domain leaves the table when its VMM ends.
        if self.with(domain, |_| Ok(())).is_err() {
            self.insert_transient(def.clone());
        }
        Ok(Pause {
            state_file,
            def,
            paused: state == State::Paused,
            reason,
        })
    }

    /// Runs the domain from a saved state with the definition it was saved
    /// with, and gives it `reason`. A guest saved paused comes back paused
    /// (the VMM's `--paused`) and does not run in between.
    async fn resume_from(&self, domain: &str, pause: Pause) -> Result<(), ManagerError> {
        let uri = format!("file:{}", pause.state_file.display());
        self.start_with(domain, Some(pause.def), Some(&uri), pause.paused)
            .await?;
        self.with(domain, |d| {
            if d.live.is_some() {
                d.reason = pause.reason;
            }
            Ok(())
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
    /// failure the disks done so far lose it again. A running domain's
    /// memory goes with it, and the guest carries on.
    pub async fn snapshot_create(
        &self,
        domain: &str,
        name: &str,
        description: Option<String>,
    ) -> Result<SnapshotInfo, ManagerError> {
        let _guard = self.lifecycle().await;
        let (def, state) = self.current_def(domain)?;
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
        let disks = snapshot_disks(&def, state.is_active())?;
        let memory = self.memory_file(domain, name);
        let pause = match state.is_active() {
            true => Some(self.pause_to(domain, memory.clone()).await?),
            false => None,
        };
        let taken = take_disk_snapshots(domain, name, &disks);
        // Whatever happened to the disks, the guest goes on.
        let resumed = match pause {
            Some(pause) => self.resume_from(domain, pause).await,
            None => Ok(()),
        };
        if let Err(e) = taken {
            if resumed.is_ok() {
                remove_snapshot_files(&memory);
            }
            return Err(e);
        }
        let info = SnapshotInfo {
            name: name.to_owned(),
            description,
            created_at: unix_now(),
            state: state_name(state).into(),
            disks,
            memory: state.is_active().then_some(memory),
        };
        let text = toml::to_string(&info).map_err(|e| ManagerError::Invalid {
            domain: domain.to_owned(),
            field: "snapshot",
            reason: e.to_string(),
        })?;
        // Kept even when the guest failed to resume: reverting to it is
        // then the way back to the guest.
        write_atomic(&self.snapshot_file(domain, name), text.as_bytes())?;
        resumed?;
        tracing::info!(
            domain,
            snapshot = name,
            memory = info.memory.is_some(),
            "snapshot taken"
        );
        Ok(info)
    }

    /// snapshot-revert: every disk back to the snapshot (all are checked
    /// for it first), and with memory the guest runs from the snapshot's
    /// state; without, the domain is shut off. A running domain is stopped.
    pub async fn snapshot_revert(&self, domain: &str, name: &str) -> Result<(), ManagerError> {
        let _guard = self.lifecycle().await;
        let info = self.snapshot(domain, name)?;
        let memory_def = match &info.memory {
            Some(state) => Some(saved_definition(domain, state)?),
            None => None,
        };
        for (i, path) in info.disks.iter().enumerate() {
            check_holds(domain, name, i, path, true)?;
        }
        let (def, state) = self.current_def(domain)?;
        if state.is_active() {
            let live = self.request_stop(domain, StopRequest::Destroy, "revert to a snapshot")?;
            crate::supervise::kill(&live);
            self.expect_exit(domain, live.record.pid, "revert to a snapshot")
                .await?;
            if self.with(domain, |_| Ok(())).is_err() {
                self.insert_transient(def);
            }
        }
        for (i, path) in info.disks.iter().enumerate() {
            open_qcow2(domain, i, path)?
                .snapshot_apply(name)
                .map_err(|e| disk_error(domain, i, path, e))?;
        }
        let (Some(state_file), Some(def)) = (info.memory, memory_def) else {
            self.with(domain, |d| {
                d.reason = Reason::FromSnapshot;
                Ok(())
            })?;
            tracing::info!(domain, snapshot = name, "reverted (shut off)");
            return Ok(());
        };
        let pause = Pause {
            state_file,
            def,
            paused: info.state == "paused",
            reason: Reason::FromSnapshot,
        };
        self.resume_from(domain, pause).await?;
        tracing::info!(
            domain,
            snapshot = name,
            "reverted (running from its memory)"
        );
        Ok(())
    }

    /// snapshot-delete: out of every disk that still has it, its memory,
    /// then the metadata. A running domain's disks are released for it
    /// the way snapshot-create does, and the guest carries on.
    pub async fn snapshot_delete(&self, domain: &str, name: &str) -> Result<(), ManagerError> {
        let _guard = self.lifecycle().await;
        let info = self.snapshot(domain, name)?;
        let (_, state) = self.current_def(domain)?;
        let pause = match state.is_active() && !info.disks.is_empty() {
            true => {
                let file = self.memory_file(domain, &format!(".deleting-{name}"));
                Some(self.pause_to(domain, file).await?)
            }
            false => None,
        };
        let deleted = delete_disk_snapshots(domain, name, &info.disks);
        if let Some(pause) = pause {
            let file = pause.state_file.clone();
            let resumed = self.resume_from(domain, pause).await;
            remove_snapshot_files(&file);
            resumed?;
        }
        deleted?;
        if let Some(memory) = &info.memory {
            remove_snapshot_files(memory);
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

/// virsh's name of a snapshot's domain state.
fn state_name(state: State) -> &'static str {
    match state {
        State::Running => "running",
        State::Paused => "paused",
        _ => "shutoff",
    }
}

/// The disks a snapshot goes into: all, and all must be writable qcow2.
/// A domain without disks has a snapshot only of its memory (`running`).
fn snapshot_disks(def: &DomainDef, running: bool) -> Result<Vec<PathBuf>, ManagerError> {
    let domain = &def.name;
    if def.disks.is_empty() && !running {
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

/// The snapshot in every disk, or in none (the ones done are undone).
fn take_disk_snapshots(domain: &str, name: &str, disks: &[PathBuf]) -> Result<(), ManagerError> {
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
    Ok(())
}

/// The snapshot out of every disk that still holds it.
fn delete_disk_snapshots(domain: &str, name: &str, disks: &[PathBuf]) -> Result<(), ManagerError> {
    for (i, path) in disks.iter().enumerate() {
        if check_holds(domain, name, i, path, false)? {
            open_qcow2(domain, i, path)?
                .snapshot_delete(name)
                .map_err(|e| disk_error(domain, i, path, e))?;
        }
    }
    Ok(())
}

/// Whether disk `index` holds snapshot `name` (read only: the disk may be
/// in use); with `required`, a disk without it is an error.
fn check_holds(
    domain: &str,
    name: &str,
    index: usize,
    path: &Path,
    required: bool,
) -> Result<bool, ManagerError> {
    let has = Chain::without_backing()
        .open_qcow2(path, true)
        .and_then(|q| q.snapshots())
        .map_err(|e| disk_error(domain, index, path, e))?
        .iter()
        .any(|s| s.name == name);
    if required && !has {
        return Err(ManagerError::Invalid {
            domain: domain.to_owned(),
            field: "snapshot",
            reason: format!(
                "{name:?}: {} ({}) no longer holds it; nothing was reverted",
                disk_target(index),
                path.display()
            ),
        });
    }
    Ok(has)
}

/// The definition saved beside a snapshot's memory.
fn saved_definition(domain: &str, state: &Path) -> Result<DomainDef, ManagerError> {
    let beside = definition_beside(state);
    let missing = |what: String| ManagerError::Invalid {
        domain: domain.to_owned(),
        field: "snapshot",
        reason: format!("{what}; nothing was reverted"),
    };
    if !state.is_file() {
        return Err(missing(format!("its memory {} is gone", state.display())));
    }
    let text = std::fs::read_to_string(&beside)
        .map_err(|e| missing(format!("{}: {e}", beside.display())))?;
    Ok(DomainDef::parse(&text, &beside.display().to_string())?)
}

/// A state file and the definition beside it.
fn remove_snapshot_files(state: &Path) {
    remove_if_exists(state);
    remove_if_exists(&definition_beside(state));
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
