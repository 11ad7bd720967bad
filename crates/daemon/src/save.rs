//! save, restore and managedsave: the VMM writes the guest's memory and
//! device state to a file (`migrate` to `file:PATH`, which leaves the guest
//! paused), the daemon stops that VMM, and a later start runs a new VMM
//! with `--incoming file:PATH`, which carries on where the guest stopped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{write_atomic, DomainDef};
use crate::error::ManagerError;
use crate::manager::{Manager, StopRequest};
use crate::migrate::MigrationJob;

/// How long writing the state may take.
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);

/// The definition saved next to a state file, so `restore` knows the domain.
pub fn definition_beside(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(".domain.toml");
    PathBuf::from(name)
}

impl Manager {
    /// Writes the running domain's state to `file` and stops its VMM; the
    /// domain is then shut off (saved).
    async fn save_state(&self, name: &str, file: &Path) -> Result<(), ManagerError> {
        let live = self.live(name, "save")?;
        let invalid = |reason: String| ManagerError::Invalid {
            domain: name.to_owned(),
            field: "file",
            reason,
        };
        if !file.is_absolute() {
            return Err(invalid(format!(
                "{}: must be an absolute path",
                file.display()
            )));
        }
        let uri = format!("file:{}", file.display());
        let job = MigrationJob {
            uri: &uri,
            action: "save",
            stop: StopRequest::Save,
            timeout: SAVE_TIMEOUT,
        };
        let failed = |why| invalid(format!("saving to {}: {why}", file.display()));
        self.migrate_then_stop(name, &live, job, failed).await
    }

    /// virsh save: the state to `file`, the definition beside it.
    pub async fn save(&self, name: &str, file: &Path) -> Result<(), ManagerError> {
        let _guard = self.lifecycle().await;
        let def = self.with(name, |d| {
            Ok(d.live.as_ref().map_or(&d.def, |l| &l.record.def).clone())
        })?;
        write_atomic(&definition_beside(file), def.to_toml()?.as_bytes())?;
        self.save_state(name, file).await
    }

    /// virsh managedsave: the state where the next start finds it.
    pub async fn managed_save(&self, name: &str) -> Result<(), ManagerError> {
        let _guard = self.lifecycle().await;
        let persistent = self.with(name, |d| Ok(d.persistent))?;
        if !persistent {
            return Err(ManagerError::Invalid {
                domain: name.to_owned(),
                field: "managedsave",
                reason: "a transient domain has no next start; use save".into(),
            });
        }
        let file = self.paths().managed_save(name);
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ManagerError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        self.save_state(name, &file).await
    }

    /// virsh restore: runs the saved domain again from `file`. A defined
    /// domain of that name starts from it; otherwise it comes back as a
    /// transient domain.
    pub async fn restore(&self, file: &Path) -> Result<String, ManagerError> {
        let beside = definition_beside(file);
        let text = std::fs::read_to_string(&beside).map_err(|source| ManagerError::Io {
            path: beside.clone(),
            source,
        })?;
        let def = DomainDef::parse(&text, &beside.display().to_string())?;
        if !file.is_file() {
            return Err(ManagerError::Invalid {
                domain: def.name.clone(),
                field: "file",
                reason: format!("{}: no saved state there", file.display()),
            });
        }
        let name = def.name.clone();
        let _guard = self.lifecycle().await;
        let known = self.with(&name, |_| Ok(())).is_ok();
        if !known {
            self.insert_transient(def);
        }
        let uri = format!("file:{}", file.display());
        if let Err(e) = self.start_from(&name, Some(&uri)).await {
            if !known {
                self.forget(&name);
            }
            return Err(e);
        }
        Ok(name)
    }
}
