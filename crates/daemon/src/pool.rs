//! Storage pools (libvirt's `pool-*` and `vol-*` verbs) of type `dir`: a
//! pool is a folder, each volume an image file in it, made, resized and
//! copied with the `diskimg` library (so qemu-img reads them as its own).
//!
//! Definitions live in `state/pools/NAME.toml`, autostart marks in
//! `state/pools/autostart/NAME`. A pool is active while its mark in
//! `run/pools/NAME` exists: pools stay active across daemon restarts, and
//! after a host reboot the autostart ones come back. Volume listings read
//! the folder each time, so files copied in by hand show up at once.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use diskimg::image::probe;
use diskimg::ops::convert::{convert, ConvertOptions};
use diskimg::qcow2::create::{create as create_qcow2, CreateOptions, Preallocation};
use diskimg::raw::Raw;
use diskimg::Format;
use serde::{Deserialize, Serialize};

use crate::config::{write_atomic, ConfigError};
use crate::devices::Disk;
use crate::error::ManagerError;
use crate::manager::remove_if_exists;
use crate::paths::Paths;
use crate::pooldef::{
    check_pool_name, check_volume_name, parse_capacity, parse_volume_ref, PoolDef, PoolType,
};

/// The pool the first system daemon start defines at `STATE/images`.
pub const DEFAULT_POOL: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("storage pool {pool:?} not found")]
    NotFound { pool: String },
    #[error("storage pool {pool:?} already exists")]
    Exists { pool: String },
    #[error("storage pool {pool:?} is {state}: cannot {action}{hint}")]
    InvalidState {
        pool: String,
        state: &'static str,
        action: &'static str,
        hint: String,
    },
    #[error("{origin}: line {line}: {message}")]
    Parse {
        origin: String,
        line: usize,
        message: String,
    },
    #[error("storage pool {pool:?}: {field}: {reason}")]
    Invalid {
        pool: String,
        field: &'static str,
        reason: String,
    },
    #[error("storage pool {pool:?}: volume {volume:?} not found")]
    VolumeNotFound { pool: String, volume: String },
    #[error("storage pool {pool:?}: volume {volume:?} already exists")]
    VolumeExists { pool: String, volume: String },
    #[error("storage pool {pool:?}: volume {volume:?} is in use by {user}: cannot {action}")]
    InUse {
        pool: String,
        volume: String,
        user: String,
        action: &'static str,
    },
    #[error("storage pool {pool:?}: volume {volume:?}: {source}")]
    Image {
        pool: String,
        volume: String,
        source: Box<diskimg::Error>,
    },
    #[error("{path}: no active storage pool holds this file")]
    NoPoolFor { path: PathBuf },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl PoolError {
    /// A stable, machine-readable error code (the domain errors' codes).
    pub fn code(&self) -> &'static str {
        match self {
            PoolError::NotFound { .. }
            | PoolError::VolumeNotFound { .. }
            | PoolError::NoPoolFor { .. } => "not_found",
            PoolError::Exists { .. } | PoolError::VolumeExists { .. } => "exists",
            PoolError::InvalidState { .. } | PoolError::InUse { .. } => "invalid_state",
            PoolError::Parse { .. } => "parse_error",
            PoolError::Invalid { .. } => "invalid_argument",
            PoolError::Image { .. } => "image_error",
            PoolError::Config(_) | PoolError::Io { .. } => "io_error",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            PoolError::NotFound { .. }
            | PoolError::VolumeNotFound { .. }
            | PoolError::NoPoolFor { .. } => 404,
            PoolError::Exists { .. }
            | PoolError::VolumeExists { .. }
            | PoolError::InvalidState { .. }
            | PoolError::InUse { .. } => 409,
            PoolError::Parse { .. } | PoolError::Invalid { .. } => 400,
            PoolError::Image { source, .. } if matches!(**source, diskimg::Error::Usage(_)) => 400,
            _ => 500,
        }
    }

    pub fn field(&self) -> Option<&'static str> {
        match self {
            PoolError::Invalid { field, .. } => Some(field),
            PoolError::InvalidState { .. } => Some("state"),
            PoolError::Exists { .. } => Some("name"),
            PoolError::VolumeExists { .. } | PoolError::VolumeNotFound { .. } => Some("volume"),
            _ => None,
        }
    }
}

/// `pool-list --details` and `pool-info`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: PoolType,
    pub target: PathBuf,
    /// running, inactive, or inaccessible (active but its folder is gone).
    pub state: String,
    pub active: bool,
    pub persistent: bool,
    pub autostart: bool,
    /// Bytes of the target's file system; only while running.
    pub capacity: Option<u64>,
    pub allocation: Option<u64>,
    pub available: Option<u64>,
    /// Volumes in the folder; only while running.
    pub volumes: Option<usize>,
}

/// `vol-info`, `vol-list --details`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub pool: String,
    pub path: PathBuf,
    /// raw, qcow2 or vmdk (as qemu-img probes it).
    pub format: String,
    /// The guest's size in bytes.
    pub capacity: u64,
    /// Bytes the file takes on the host.
    pub allocation: u64,
    pub backing: Option<PathBuf>,
    pub backing_format: Option<String>,
}

/// `vol-create-as POOL NAME CAPACITY [--allocation A] [--format F]
/// [--backing-vol B --backing-vol-format BF] [--prealloc-metadata]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeRequest {
    pub name: String,
    /// A virsh scaled integer: bytes, or `10G`, `512MiB`, `1GB`.
    pub capacity: String,
    /// Raw volumes: bytes reserved on the host now (fallocate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<String>,
    /// raw (the default) or qcow2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// A volume of the same pool, or an absolute path (qcow2 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_vol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing_vol_format: Option<String>,
    /// qcow2: allocate the metadata (L2 tables) now.
    #[serde(default)]
    pub prealloc_metadata: bool,
}

/// `vol-resize VOL CAPACITY [--delta] [--shrink]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    /// The new size, or with `delta` the change; `-SIZE` shrinks by SIZE.
    pub capacity: String,
    #[serde(default)]
    pub delta: bool,
    #[serde(default)]
    pub shrink: bool,
}

/// A domain disk's image, for the checks that keep volumes in use.
#[derive(Debug, Clone)]
pub struct DiskUser {
    pub domain: String,
    pub path: PathBuf,
    pub running: bool,
}

/// Temporary volume names are unique within the daemon.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// The daemon's storage pools.
#[derive(Debug)]
pub struct Pools {
    /// `state/pools`: definitions, and `autostart/` marks.
    defs: PathBuf,
    /// `run/pools`: one mark per active pool.
    active: PathBuf,
    /// Serialises the verbs that check and then change definitions.
    serial: Mutex<()>,
}

impl Pools {
    /// Opens the daemon's pools. On the first start (no pools folder yet),
    /// with `default`, the `default` pool is defined at the images folder,
    /// built and marked autostart, as the default network is; a failure is
    /// logged and the daemon runs on without it.
    pub fn open(paths: &Paths, default: bool) -> Self {
        let pools = Pools {
            defs: paths.pools_dir(),
            active: paths.pools_run_dir(),
            serial: Mutex::new(()),
        };
        if default && !pools.defs.exists() {
            if let Err(e) = pools.define_default(&paths.images_dir()) {
                tracing::warn!(error = %e, "cannot define the default storage pool");
            }
        }
        pools
    }

    fn define_default(&self, target: &Path) -> Result<(), PoolError> {
        let def = PoolDef {
            name: DEFAULT_POOL.into(),
            kind: PoolType::Dir,
            target: target.to_owned(),
        };
        def.validate()?;
        make_dir(target)?;
        write_atomic(&self.definition(DEFAULT_POOL), def.to_toml().as_bytes())?;
        write_atomic(&self.autostart(DEFAULT_POOL), b"")?;
        tracing::info!(target = %target.display(), "defined the default storage pool");
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn definition(&self, name: &str) -> PathBuf {
        self.defs.join(format!("{name}.toml"))
    }

    fn autostart(&self, name: &str) -> PathBuf {
        self.defs.join("autostart").join(name)
    }

    fn mark(&self, name: &str) -> PathBuf {
        self.active.join(name)
    }

    fn load(&self, name: &str) -> Result<(PoolDef, String), PoolError> {
        check_pool_name(name).map_err(|reason| PoolError::Invalid {
            pool: name.to_owned(),
            field: "name",
            reason,
        })?;
        let path = self.definition(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PoolError::NotFound {
                    pool: name.to_owned(),
                })
            }
            Err(source) => return Err(PoolError::Io { path, source }),
        };
        let def = PoolDef::parse(&text, &path.display().to_string())?;
        Ok((def, text))
    }

    /// Every definition that loads (others are logged and left out).
    fn all(&self) -> Vec<PoolDef> {
        let Ok(entries) = std::fs::read_dir(&self.defs) else {
            return Vec::new();
        };
        let mut defs: Vec<PoolDef> = entries
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().into_owned();
                let name = file.strip_suffix(".toml")?.to_owned();
                match self.load(&name) {
                    Ok((def, _)) => Some(def),
                    Err(e) => {
                        tracing::warn!(pool = name, error = %e, "skipping a pool definition");
                        None
                    }
                }
            })
            .collect();
        defs.sort_by(|a, b| a.name.cmp(&b.name));
        defs
    }

    fn is_active(&self, name: &str) -> bool {
        self.mark(name).exists()
    }

    /// At daemon start: autostart pools that are not active are started
    /// (failures are logged: the daemon runs on).
    pub fn resume(&self) {
        for def in self.all() {
            if self.autostart(&def.name).exists() && !self.is_active(&def.name) {
                if let Err(e) = self.start(&def.name) {
                    tracing::warn!(pool = def.name, error = %e, "storage pool not started");
                }
            }
        }
    }

    pub fn list(&self, all: bool) -> Vec<PoolInfo> {
        self.all()
            .into_iter()
            .map(|def| self.describe(def))
            .filter(|info| all || info.active)
            .collect()
    }

    pub fn info(&self, name: &str) -> Result<PoolInfo, PoolError> {
        Ok(self.describe(self.load(name)?.0))
    }

    fn describe(&self, def: PoolDef) -> PoolInfo {
        let active = self.is_active(&def.name);
        let running = active && def.target.is_dir();
        let space = running
            .then(|| nix::sys::statvfs::statvfs(&def.target).ok())
            .flatten();
        let frsize = space.as_ref().map_or(0, |s| s.fragment_size());
        let bytes = |blocks: u64| blocks.saturating_mul(frsize);
        PoolInfo {
            state: match (active, running) {
                (false, _) => "inactive",
                (true, true) => "running",
                (true, false) => "inaccessible",
            }
            .to_owned(),
            active,
            persistent: true,
            autostart: self.autostart(&def.name).exists(),
            capacity: space.as_ref().map(|s| bytes(s.blocks())),
            allocation: space
                .as_ref()
                .map(|s| bytes(s.blocks().saturating_sub(s.blocks_free()))),
            available: space.as_ref().map(|s| bytes(s.blocks_available())),
            volumes: running.then(|| volume_names(&def.target).len()),
            name: def.name,
            kind: def.kind,
            target: def.target,
        }
    }

    /// The definition as written (comments too).
    pub fn config_text(&self, name: &str) -> Result<String, PoolError> {
        Ok(self.load(name)?.1)
    }

    /// Checks and stores a new pool; an existing name, or a target another
    /// pool has, is refused and nothing is written.
    pub fn define(&self, text: &str, origin: &str) -> Result<PoolInfo, PoolError> {
        let def = PoolDef::parse(text, origin)?;
        def.validate()?;
        {
            let _serial = self.lock();
            if self.definition(&def.name).exists() {
                return Err(PoolError::Exists { pool: def.name });
            }
            if let Some(other) = self.all().into_iter().find(|o| o.target == def.target) {
                return Err(PoolError::Invalid {
                    pool: def.name,
                    field: "target",
                    reason: format!(
                        "{} is storage pool {:?}'s target already",
                        other.target.display(),
                        other.name
                    ),
                });
            }
            write_atomic(&self.definition(&def.name), text.as_bytes())?;
        }
        tracing::info!(pool = def.name, "storage pool defined");
        self.info(&def.name)
    }

    /// Removes an inactive pool's definition and autostart mark; its
    /// folder and volumes stay (pool-delete removes the folder).
    pub fn undefine(&self, name: &str) -> Result<(), PoolError> {
        let _serial = self.lock();
        self.load(name)?;
        self.require_inactive(name, "undefine", "pool-destroy")?;
        let path = self.definition(name);
        std::fs::remove_file(&path).map_err(|source| PoolError::Io { path, source })?;
        remove_if_exists(&self.autostart(name));
        tracing::info!(pool = name, "storage pool undefined");
        Ok(())
    }

    fn require_inactive(
        &self,
        name: &str,
        action: &'static str,
        verb: &str,
    ) -> Result<(), PoolError> {
        match self.is_active(name) {
            true => Err(PoolError::InvalidState {
                pool: name.to_owned(),
                state: "active",
                action,
                hint: format!(" ({verb} it first)"),
            }),
            false => Ok(()),
        }
    }

    /// pool-build: makes the target folder (and its parents).
    pub fn build(&self, name: &str) -> Result<PoolInfo, PoolError> {
        let (def, _) = self.load(name)?;
        def.validate()?;
        make_dir(&def.target)?;
        tracing::info!(pool = name, target = %def.target.display(), "storage pool built");
        self.info(name)
    }

    /// pool-start: the target folder must be there (pool-build makes it).
    pub fn start(&self, name: &str) -> Result<PoolInfo, PoolError> {
        {
            let _serial = self.lock();
            let (def, _) = self.load(name)?;
            def.validate()?;
            if self.is_active(name) {
                return Err(PoolError::InvalidState {
                    pool: name.to_owned(),
                    state: "active",
                    action: "start",
                    hint: " (it is running already)".into(),
                });
            }
            if !def.target.is_dir() {
                return Err(PoolError::Invalid {
                    pool: name.to_owned(),
                    field: "target",
                    reason: format!(
                        "{}: no such folder (make it with: oxvirt pool-build {name})",
                        def.target.display()
                    ),
                });
            }
            write_atomic(&self.mark(name), b"")?;
        }
        tracing::info!(pool = name, "storage pool started");
        self.info(name)
    }

    /// pool-destroy: the pool goes inactive; its volumes stay untouched.
    pub fn destroy(&self, name: &str) -> Result<PoolInfo, PoolError> {
        {
            let _serial = self.lock();
            self.load(name)?;
            if !self.is_active(name) {
                return Err(PoolError::InvalidState {
                    pool: name.to_owned(),
                    state: "inactive",
                    action: "destroy",
                    hint: String::new(),
                });
            }
            let mark = self.mark(name);
            std::fs::remove_file(&mark).map_err(|source| PoolError::Io { path: mark, source })?;
        }
        tracing::info!(pool = name, "storage pool destroyed");
        self.info(name)
    }

    /// pool-delete: removes an inactive pool's (empty) target folder.
    pub fn delete(&self, name: &str) -> Result<(), PoolError> {
        let _serial = self.lock();
        let (def, _) = self.load(name)?;
        self.require_inactive(name, "delete", "pool-destroy")?;
        std::fs::remove_dir(&def.target).map_err(|source| PoolError::Io {
            path: def.target.clone(),
            source,
        })?;
        tracing::info!(pool = name, target = %def.target.display(), "storage pool folder deleted");
        Ok(())
    }

    /// pool-refresh: listings read the folder each time, so this checks
    /// that the pool can be read and reports it.
    pub fn refresh(&self, name: &str) -> Result<PoolInfo, PoolError> {
        self.running(name, "refresh")?;
        self.info(name)
    }

    pub fn set_autostart(&self, name: &str, enabled: bool) -> Result<PoolInfo, PoolError> {
        self.load(name)?;
        let mark = self.autostart(name);
        if enabled {
            write_atomic(&mark, b"")?;
        } else {
            remove_if_exists(&mark);
        }
        self.info(name)
    }

    /// The definition of a running pool, or why it is not one.
    fn running(&self, name: &str, action: &'static str) -> Result<PoolDef, PoolError> {
        let (def, _) = self.load(name)?;
        if !self.is_active(name) {
            return Err(PoolError::InvalidState {
                pool: name.to_owned(),
                state: "inactive",
                action,
                hint: format!(" (start it: oxvirt pool-start {name})"),
            });
        }
        if !def.target.is_dir() {
            return Err(PoolError::InvalidState {
                pool: name.to_owned(),
                state: "inaccessible",
                action,
                hint: format!(" ({} is gone)", def.target.display()),
            });
        }
        Ok(def)
    }

    /// The path of an existing volume of a running pool.
    fn volume_path(
        &self,
        pool: &str,
        volume: &str,
        action: &'static str,
    ) -> Result<PathBuf, PoolError> {
        let def = self.running(pool, action)?;
        check_volume_name(volume).map_err(|reason| PoolError::Invalid {
            pool: pool.to_owned(),
            field: "volume",
            reason,
        })?;
        let path = def.target.join(volume);
        match path.is_file() {
            true => Ok(path),
            false => Err(PoolError::VolumeNotFound {
                pool: pool.to_owned(),
                volume: volume.to_owned(),
            }),
        }
    }

    pub fn volumes(&self, pool: &str) -> Result<Vec<VolumeInfo>, PoolError> {
        let def = self.running(pool, "list volumes")?;
        Ok(volume_names(&def.target)
            .into_iter()
            .map(|name| {
                let path = def.target.join(&name);
                describe_volume(pool, name, path)
            })
            .collect())
    }

    pub fn volume(&self, pool: &str, volume: &str) -> Result<VolumeInfo, PoolError> {
        let path = self.volume_path(pool, volume, "describe a volume")?;
        Ok(describe_volume(pool, volume.to_owned(), path))
    }

    /// The volume a path names (`vol-info /var/lib/oxvirt/images/x.qcow2`).
    pub fn volume_by_path(&self, path: &Path) -> Result<VolumeInfo, PoolError> {
        let not_found = || PoolError::NoPoolFor {
            path: path.to_owned(),
        };
        let dir = path.parent().ok_or_else(not_found)?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(not_found)?;
        let pool = self
            .all()
            .into_iter()
            .find(|def| self.is_active(&def.name) && same_file(&def.target, dir))
            .ok_or_else(not_found)?;
        self.volume(&pool.name, name)
    }

    /// vol-create-as: a new image, complete or not there at all.
    pub fn create_volume(&self, pool: &str, req: &VolumeRequest) -> Result<VolumeInfo, PoolError> {
        let def = self.running(pool, "create a volume")?;
        let invalid = |field, reason| PoolError::Invalid {
            pool: pool.to_owned(),
            field,
            reason,
        };
        check_volume_name(&req.name).map_err(|r| invalid("name", r))?;
        let capacity = parse_capacity(&req.capacity).map_err(|r| invalid("capacity", r))?;
        let format = volume_format(req.format.as_deref()).map_err(|r| invalid("format", r))?;
        let path = def.target.join(&req.name);
        if path.exists() {
            return Err(PoolError::VolumeExists {
                pool: pool.to_owned(),
                volume: req.name.clone(),
            });
        }
        let plan = match format {
            Format::Qcow2 => Plan::Qcow2(self.qcow2_options(pool, &def, req, capacity)?),
            _ => {
                if req.backing_vol.is_some() || req.prealloc_metadata {
                    return Err(invalid(
                        "format",
                        "a backing volume and --prealloc-metadata need --format qcow2".into(),
                    ));
                }
                let allocation = match &req.allocation {
                    Some(text) => parse_capacity(text)
                        .map_err(|r| invalid("allocation", r))?
                        .min(capacity),
                    None => 0,
                };
                Plan::Raw {
                    capacity,
                    allocation,
                }
            }
        };
        install(pool, &def.target, &req.name, |tmp| plan.make(tmp))?;
        tracing::info!(
            pool,
            volume = req.name,
            format = format.name(),
            capacity,
            "volume created"
        );
        self.volume(pool, &req.name)
    }

    fn qcow2_options(
        &self,
        pool: &str,
        def: &PoolDef,
        req: &VolumeRequest,
        capacity: u64,
    ) -> Result<CreateOptions, PoolError> {
        let invalid = |field, reason| PoolError::Invalid {
            pool: pool.to_owned(),
            field,
            reason,
        };
        if req.allocation.is_some() {
            return Err(invalid(
                "allocation",
                "qcow2 volumes grow as the guest writes; use --prealloc-metadata, or a raw volume"
                    .into(),
            ));
        }
        let backing = match &req.backing_vol {
            None => None,
            Some(vol) if vol.starts_with('/') => {
                let path = PathBuf::from(vol);
                if !path.is_file() {
                    return Err(invalid("backing_vol", format!("{vol}: no such image file")));
                }
                Some(path)
            }
            Some(vol) => Some(self.volume_path(pool, vol, "use a backing volume")?),
        };
        let backing_format = match (&backing, &req.backing_vol_format) {
            (None, Some(_)) => {
                return Err(invalid(
                    "backing_vol_format",
                    "given without --backing-vol".into(),
                ))
            }
            (Some(_), Some(f)) => Some(
                volume_format(Some(f))
                    .map_err(|r| invalid("backing_vol_format", r))?
                    .name()
                    .to_owned(),
            ),
            (Some(path), None) => Some(
                probe(path)
                    .map_err(image_error(pool, &req.name))?
                    .name()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        if backing.as_deref() == Some(def.target.join(&req.name).as_path()) {
            return Err(invalid(
                "backing_vol",
                "a volume cannot be its own backing".into(),
            ));
        }
        Ok(CreateOptions {
            size: capacity,
            backing_file: backing.map(|p| p.display().to_string()),
            backing_format,
            preallocation: if req.prealloc_metadata {
                Preallocation::Metadata
            } else {
                Preallocation::Off
            },
            ..CreateOptions::default()
        })
    }

    /// vol-delete: refused while a domain's disk or another volume's
    /// backing file is this volume.
    pub fn delete_volume(
        &self,
        pool: &str,
        volume: &str,
        users: &[DiskUser],
    ) -> Result<(), PoolError> {
        let path = self.volume_path(pool, volume, "delete a volume")?;
        let in_use = |user: String| PoolError::InUse {
            pool: pool.to_owned(),
            volume: volume.to_owned(),
            user,
            action: "delete it",
        };
        if let Some(user) = users.iter().find(|u| same_file(&u.path, &path)) {
            return Err(in_use(format!("domain {:?}", user.domain)));
        }
        if let Some(child) = self
            .volumes(pool)?
            .into_iter()
            .find(|v| v.backing.as_deref().is_some_and(|b| same_file(b, &path)))
        {
            return Err(in_use(format!(
                "volume {:?} (its backing file)",
                child.name
            )));
        }
        std::fs::remove_file(&path).map_err(|source| PoolError::Io { path, source })?;
        tracing::info!(pool, volume, "volume deleted");
        Ok(())
    }

    /// vol-resize; refused while a running domain has the volume open.
    pub fn resize_volume(
        &self,
        pool: &str,
        volume: &str,
        req: &ResizeRequest,
        users: &[DiskUser],
    ) -> Result<VolumeInfo, PoolError> {
        let path = self.volume_path(pool, volume, "resize a volume")?;
        refuse_running(pool, volume, &path, users, "resize it")?;
        let current = describe_volume(pool, volume.to_owned(), path.clone());
        let capacity =
            new_capacity(current.capacity, req).map_err(|reason| PoolError::Invalid {
                pool: pool.to_owned(),
                field: "capacity",
                reason,
            })?;
        let format = current.format.parse::<Format>().ok();
        diskimg::ops::resize::resize(&path, format, capacity, req.shrink)
            .map_err(image_error(pool, volume))?;
        tracing::info!(pool, volume, capacity, "volume resized");
        self.volume(pool, volume)
    }

    /// vol-clone: a full copy (a backing chain is flattened) in the same
    /// format; refused while a running domain writes the source.
    pub fn clone_volume(
        &self,
        pool: &str,
        volume: &str,
        new_name: &str,
        users: &[DiskUser],
    ) -> Result<VolumeInfo, PoolError> {
        let def = self.running(pool, "clone a volume")?;
        let source = self.volume_path(pool, volume, "clone a volume")?;
        check_volume_name(new_name).map_err(|reason| PoolError::Invalid {
            pool: pool.to_owned(),
            field: "name",
            reason,
        })?;
        if def.target.join(new_name).exists() {
            return Err(PoolError::VolumeExists {
                pool: pool.to_owned(),
                volume: new_name.to_owned(),
            });
        }
        refuse_running(pool, volume, &source, users, "clone it")?;
        let format = probe(&source).map_err(image_error(pool, volume))?;
        let opts = ConvertOptions {
            out_format: format,
            threads: 1,
            ..ConvertOptions::default()
        };
        install(pool, &def.target, new_name, |tmp| {
            convert(&[(source.clone(), Some(format))], tmp, &opts, &mut |_| {})
        })?;
        tracing::info!(pool, volume, clone = new_name, "volume cloned");
        self.volume(pool, new_name)
    }

    /// Fills in the path of each disk that names a `volume` (a running
    /// pool's existing volume); errors name the domain and the disk.
    pub(crate) fn resolve_disks(
        &self,
        domain: &str,
        disks: &mut [Disk],
    ) -> Result<(), ManagerError> {
        for (i, disk) in disks.iter_mut().enumerate() {
            let Some(volume) = &disk.volume else {
                continue;
            };
            let invalid = |reason: String| ManagerError::Invalid {
                domain: domain.to_owned(),
                field: "disk.volume",
                reason: format!("{} ({volume}): {reason}", crate::devices::disk_target(i)),
            };
            let (pool, name) = parse_volume_ref(volume).map_err(invalid)?;
            disk.path = self
                .volume_path(pool, name, "give a domain its volume")
                .map_err(|e| invalid(e.to_string()))?;
        }
        Ok(())
    }
}

/// How a new volume's image is made.
enum Plan {
    Raw { capacity: u64, allocation: u64 },
    Qcow2(CreateOptions),
}

impl Plan {
    fn make(&self, path: &Path) -> Result<(), diskimg::Error> {
        match self {
            Plan::Raw {
                capacity,
                allocation,
            } => {
                Raw::create(path, *capacity)?;
                reserve(path, *allocation)
            }
            Plan::Qcow2(opts) => create_qcow2(path, opts),
        }
    }
}

/// Reserves the first `len` bytes of a raw image on the host (fallocate).
fn reserve(path: &Path, len: u64) -> Result<(), diskimg::Error> {
    if len == 0 {
        return Ok(());
    }
    let io = |source| diskimg::Error::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io)?;
    let len = i64::try_from(len).map_err(|_| io(std::io::ErrorKind::InvalidInput.into()))?;
    nix::fcntl::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, len)
        .map_err(|e| io(e.into()))
}

/// Makes a volume under a temporary name and links it in under `name`
/// only when it is complete, so a failure or a name taken meanwhile
/// leaves nothing behind and nothing overwritten.
fn install(
    pool: &str,
    dir: &Path,
    name: &str,
    make: impl FnOnce(&Path) -> Result<(), diskimg::Error>,
) -> Result<(), PoolError> {
    let tmp = dir.join(format!(
        ".oxvirt-new-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let io = |source| PoolError::Io {
        path: tmp.clone(),
        source,
    };
    let result = make(&tmp).map_err(image_error(pool, name)).and_then(|()| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        std::fs::hard_link(&tmp, dir.join(name)).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => PoolError::VolumeExists {
                pool: pool.to_owned(),
                volume: name.to_owned(),
            },
            _ => io(e),
        })
    });
    remove_if_exists(&tmp);
    result
}

/// A diskimg error about `volume`, boxed (it is large).
fn image_error<'a>(
    pool: &'a str,
    volume: &'a str,
) -> impl FnOnce(diskimg::Error) -> PoolError + 'a {
    move |source| PoolError::Image {
        pool: pool.to_owned(),
        volume: volume.to_owned(),
        source: Box::new(source),
    }
}

fn refuse_running(
    pool: &str,
    volume: &str,
    path: &Path,
    users: &[DiskUser],
    action: &'static str,
) -> Result<(), PoolError> {
    match users.iter().find(|u| u.running && same_file(&u.path, path)) {
        Some(user) => Err(PoolError::InUse {
            pool: pool.to_owned(),
            volume: volume.to_owned(),
            user: format!("running domain {:?}", user.domain),
            action,
        }),
        None => Ok(()),
    }
}

/// vol-resize's capacity: absolute, `--delta` growth, or `-SIZE` (with
/// `--shrink`) less than now.
fn new_capacity(current: u64, req: &ResizeRequest) -> Result<u64, String> {
    match req.capacity.trim().strip_prefix('-') {
        Some(less) => {
            if !req.shrink {
                return Err(format!(
                    "{:?}: a negative size needs --shrink",
                    req.capacity
                ));
            }
            let less = parse_capacity(less)?;
            current.checked_sub(less).ok_or_else(|| {
                format!("{:?}: more than the volume's {current} bytes", req.capacity)
            })
        }
        None => {
            let value = parse_capacity(&req.capacity)?;
            match req.delta {
                true => current
                    .checked_add(value)
                    .ok_or_else(|| format!("{:?}: too large", req.capacity)),
                false => Ok(value),
            }
        }
    }
}

/// raw (the default) or qcow2.
fn volume_format(text: Option<&str>) -> Result<Format, String> {
    match text.unwrap_or("raw") {
        "raw" => Ok(Format::Raw),
        "qcow2" => Ok(Format::Qcow2),
        other => Err(format!("{other:?}: expected raw or qcow2")),
    }
}

/// The pool folder's regular files, by name, except hidden ones.
fn volume_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| check_volume_name(name).is_ok())
        .collect();
    names.sort();
    names
}

/// A volume's format and sizes; an image diskimg cannot read is shown as
/// its format with the file's size (and the problem logged).
fn describe_volume(pool: &str, name: String, path: PathBuf) -> VolumeInfo {
    let meta = std::fs::metadata(&path).ok();
    let mut info = VolumeInfo {
        pool: pool.to_owned(),
        format: "raw".into(),
        capacity: meta.as_ref().map_or(0, |m| m.len()),
        allocation: meta.as_ref().map_or(0, |m| m.blocks() * 512),
        backing: None,
        backing_format: None,
        name,
        path,
    };
    let described = probe(&info.path).and_then(|f| {
        info.format = f.name().to_owned();
        diskimg::ops::info::info(&info.path, Some(f))
    });
    match described {
        Ok(image) => {
            info.capacity = image.virtual_size;
            info.backing = image.full_backing_filename.map(PathBuf::from);
            info.backing_format = image.backing_filename_format;
        }
        Err(e) => {
            tracing::warn!(pool, volume = info.name, error = %e, "cannot read the volume's image")
        }
    }
    info
}

/// Two paths name the same file (or, where one is missing, are equal).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => a == b,
    }
}

fn make_dir(path: &Path) -> Result<(), PoolError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|source| PoolError::Io {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resize(capacity: &str, delta: bool, shrink: bool) -> Result<u64, String> {
        new_capacity(
            10 << 30,
            &ResizeRequest {
                capacity: capacity.into(),
                delta,
                shrink,
            },
        )
    }

    #[test]
    fn resize_sizes_follow_virsh() {
        assert_eq!(resize("20G", false, false), Ok(20 << 30));
        assert_eq!(resize("1G", true, false), Ok(11 << 30));
        assert_eq!(resize("-1G", true, true), Ok(9 << 30));
        assert_eq!(resize("-1G", false, true), Ok(9 << 30));
        assert!(resize("-1G", true, false).unwrap_err().contains("--shrink"));
        assert!(resize("-11G", true, true)
            .unwrap_err()
            .contains("more than"));
        assert!(resize("lots", false, false)
            .unwrap_err()
            .contains("\"lots\""));
    }

    #[test]
    fn formats_are_raw_or_qcow2() {
        assert_eq!(volume_format(None), Ok(Format::Raw));
        assert_eq!(volume_format(Some("qcow2")), Ok(Format::Qcow2));
        assert!(volume_format(Some("vmdk")).unwrap_err().contains("vmdk"));
    }
}
