//! The domain table and the lifecycle verbs: define, undefine, start,
//! shutdown, destroy, reboot, suspend, resume, autostart, and recovery of
//! running domains after a daemon restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use host::cgroup::{DomainCgroup, Layout, ParentGroup};
use host::net::NatConfig;
use serde::{Deserialize, Serialize};

use crate::config::{write_atomic, ConfigError, DomainDef};
use crate::console::{Attachment, ConsoleError, ConsoleRelay};
use crate::domain::{is_same_process, Reason, Record, State};
use crate::error::ManagerError;
use crate::paths::Paths;
use crate::supervise::{self, Exit};
use crate::vmm_client;

/// Where domains' cgroups go.
#[derive(Debug, Clone)]
pub struct CgroupPlacement {
    pub layout: Layout,
    pub parent: ParentGroup,
}

/// How the manager runs.
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    pub paths: Paths,
    /// The `oxvirt` binary whose `vmm` subcommand runs a domain.
    pub vmm_binary: PathBuf,
    /// `None`: no cgroups (a daemon without root).
    pub cgroups: Option<CgroupPlacement>,
    /// The `default` network the first start defines (`None`: none).
    pub network: Option<NatConfig>,
    /// Define the `default` storage pool (at STATE/images) on the first start.
    pub default_pool: bool,
}

/// Who asked a running domain to stop, so its exit is not a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopRequest {
    Shutdown,
    Destroy,
    /// save / managedsave: the state went to a file first.
    Save,
    /// migrate: the guest runs on another host now.
    Migrate,
}

/// A running (or paused) domain's process.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub record: Record,
    pub cgroup: Option<DomainCgroup>,
    pub stop: Option<StopRequest>,
    pub api: PathBuf,
    pub run_dir: PathBuf,
    /// The serial console relay (none when the daemon could not reconnect).
    pub console: Option<ConsoleRelay>,
}

#[derive(Debug)]
pub(crate) struct Domain {
    /// The definition (for a transient domain, the one it runs with).
    pub def: DomainDef,
    pub persistent: bool,
    pub state: State,
    pub reason: Reason,
    pub exit_code: Option<i32>,
    pub live: Option<Live>,
}

/// One line of `list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DomainSummary {
    pub name: String,
    pub state: State,
    pub pid: Option<u32>,
    pub persistent: bool,
    pub autostart: bool,
}

/// `dominfo`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DomainInfo {
    pub name: String,
    pub state: State,
    pub reason: String,
    pub persistent: bool,
    pub autostart: bool,
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Hard limit of the VMM's memory in bytes, where set.
    pub memory_limit: Option<u64>,
    pub pid: Option<u32>,
    pub vcpu_tids: Vec<u32>,
    pub cpu_time_ns: Option<u64>,
    pub memory_usage: Option<u64>,
    pub oom_kills: Option<u64>,
    /// The VMM's exit status the last time it ended.
    pub exit_code: Option<i32>,
    pub console_log: PathBuf,
    pub cgroups: Vec<PathBuf>,
    /// A managedsave state waits for the next start.
    #[serde(default)]
    pub managed_save: bool,
}

/// `domstate --reason`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StateInfo {
    pub state: State,
    pub reason: String,
}

/// The manager: cheap to clone, shared by the API handlers and supervisors.
#[derive(Clone)]
pub struct Manager(pub(crate) Arc<Inner>);

pub(crate) struct Inner {
    pub opts: ManagerOptions,
    domains: Mutex<BTreeMap<String, Domain>>,
    /// The virtual networks and their DHCP servers.
    pub(crate) networks: crate::network::Networks,
    /// The storage pools.
    pub(crate) pools: crate::pool::Pools,
    /// Serialises define, undefine and start, which check then change.
    lifecycle: tokio::sync::Mutex<()>,
}

const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl Manager {
    /// Loads the definitions, finds running domains again and starts the
    /// autostart ones.
    pub async fn open(opts: ManagerOptions) -> Result<Self, ManagerError> {
        for dir in [
            opts.paths.domains_dir(),
            opts.paths.autostart_dir(),
            opts.paths.log_dir(),
            opts.paths.running_dir(),
        ] {
            std::fs::create_dir_all(&dir).map_err(|source| ManagerError::Io {
                path: dir.clone(),
                source,
            })?;
        }
        // Pools first: definitions name their volumes.
        let pools = crate::pool::Pools::open(&opts.paths, opts.default_pool);
        pools.resume();
        let manager = Manager(Arc::new(Inner {
            domains: Mutex::new(load_definitions(&opts.paths, &pools)),
            networks: crate::network::Networks::open(&opts.paths.state_dir, opts.network.as_ref()),
            pools,
            opts,
            lifecycle: tokio::sync::Mutex::new(()),
        }));
        manager.recover().await;
        manager.0.networks.resume();
        manager.autostart_all().await;
        Ok(manager)
    }

    /// Serialises verbs that check a domain's state and then change it.
    pub(crate) async fn lifecycle(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.0.lifecycle.lock().await
    }

    pub fn paths(&self) -> &Paths {
        &self.0.opts.paths
    }

    pub(crate) fn table(&self) -> MutexGuard<'_, BTreeMap<String, Domain>> {
        self.0.domains.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn autostart(&self, name: &str) -> bool {
        self.paths().autostart_mark(name).exists()
    }

    pub fn list(&self, all: bool) -> Vec<DomainSummary> {
        let table = self.table();
        table
            .iter()
            .filter(|(_, d)| all || d.state.is_active())
            .map(|(name, d)| DomainSummary {
                name: name.clone(),
                state: d.state,
                pid: d.live.as_ref().map(|l| l.record.pid),
                persistent: d.persistent,
                autostart: d.persistent && self.autostart(name),
            })
            .collect()
    }

    /// Runs `f` on the named domain.
    pub(crate) fn with<T>(
        &self,
        name: &str,
        f: impl FnOnce(&mut Domain) -> Result<T, ManagerError>,
    ) -> Result<T, ManagerError> {
        let mut table = self.table();
        let domain = table.get_mut(name).ok_or_else(|| ManagerError::NotFound {
            domain: name.to_owned(),
        })?;
        f(domain)
    }

    /// The live part of a running domain, or an error naming `action`.
    pub(crate) fn live(&self, name: &str, action: &'static str) -> Result<Live, ManagerError> {
        self.with(name, |d| {
            d.live.clone().ok_or(ManagerError::InvalidState {
                domain: name.to_owned(),
                state: d.state,
                action,
                hint: "",
            })
        })
    }

    pub fn state(&self, name: &str) -> Result<StateInfo, ManagerError> {
        self.with(name, |d| {
            Ok(StateInfo {
                state: d.state,
                reason: d.reason.to_string(),
            })
        })
    }

    pub fn info(&self, name: &str) -> Result<DomainInfo, ManagerError> {
        let (mut info, cgroup) = self.with(name, |d| {
            let def = d.live.as_ref().map_or(&d.def, |l| &l.record.def);
            let info = DomainInfo {
                name: name.to_owned(),
                state: d.state,
                reason: d.reason.to_string(),
                persistent: d.persistent,
                autostart: false,
                vcpus: def.vcpus,
                memory: def.memory.0,
                memory_limit: def.resources.memory_limit.map(|l| l.0),
                pid: d.live.as_ref().map(|l| l.record.pid),
                vcpu_tids: d
                    .live
                    .as_ref()
                    .map(|l| l.record.vcpu_tids.clone())
                    .unwrap_or_default(),
                cpu_time_ns: None,
                memory_usage: None,
                oom_kills: None,
                exit_code: d.exit_code,
                console_log: self.paths().console_log(name),
                cgroups: Vec::new(),
                managed_save: self.paths().managed_save(name).exists(),
            };
            Ok((info, d.live.as_ref().and_then(|l| l.cgroup.clone())))
        })?;
        info.autostart = info.persistent && self.autostart(name);
        if let Some(cg) = cgroup {
            info.cgroups = cg.paths().into_iter().map(Path::to_owned).collect();
            if let Ok(stats) = cg.stats() {
                info.cpu_time_ns = Some(stats.cpu_usage_ns);
                info.memory_usage = stats.memory_usage;
                info.oom_kills = stats.oom_kills;
            }
        }
        Ok(info)
    }

    /// The definition as TOML: the file as written for a persistent domain.
    pub fn config_text(&self, name: &str) -> Result<String, ManagerError> {
        let (persistent, def) = self.with(name, |d| Ok((d.persistent, d.def.clone())))?;
        if persistent {
            let path = self.paths().definition(name);
            return std::fs::read_to_string(&path)
                .map_err(|source| ManagerError::Io { path, source });
        }
        Ok(def.to_toml()?)
    }

    /// Defines a persistent domain from TOML text; `origin` names the text
    /// in errors. Nothing is written unless the definition is valid and new.
    pub async fn define(&self, text: &str, origin: &str) -> Result<String, ManagerError> {
        let mut def = DomainDef::parse(text, origin)?;
        self.0.pools.resolve_disks(&def.name, &mut def.disks)?;
        def.validate()?;
        let _guard = self.0.lifecycle.lock().await;
        if self.table().contains_key(&def.name) {
            return Err(ManagerError::Exists { domain: def.name });
        }
        write_atomic(&self.paths().definition(&def.name), text.as_bytes())?;
        tracing::info!(domain = def.name, "defined");
        let name = def.name.clone();
        self.table().insert(name.clone(), inactive(def, true));
        Ok(name)
    }

    /// Removes a definition. A running domain needs `force` and then stays
    /// running as a transient domain (libvirt's behaviour).
    pub async fn undefine(
        &self,
        name: &str,
        force: bool,
        snapshots_metadata: bool,
    ) -> Result<(), ManagerError> {
        let _guard = self.0.lifecycle.lock().await;
        if self.has_snapshots(name) && !snapshots_metadata {
            return Err(ManagerError::Invalid {
                domain: name.to_owned(),
                field: "snapshots",
                reason: "it has snapshots: undefine with --snapshots-metadata (the disks keep them), or delete them first".into(),
            });
        }
        let remove = self.with(name, |d| {
            if !d.persistent {
                return Err(ManagerError::InvalidState {
                    domain: name.to_owned(),
                    state: d.state,
                    action: "undefine",
                    hint: " (it is transient: destroy it)",
                });
            }
            if d.state.is_active() && !force {
                return Err(ManagerError::InvalidState {
                    domain: name.to_owned(),
                    state: d.state,
                    action: "undefine",
                    hint: " without --force (stop it first, or use --force to keep it running as a transient domain)",
                });
            }
            Ok(!d.state.is_active())
        })?;
        let path = self.paths().definition(name);
        std::fs::remove_file(&path).map_err(|source| ManagerError::Io { path, source })?;
        remove_if_exists(&self.paths().autostart_mark(name));
        remove_if_exists(&self.paths().managed_save(name));
        crate::cloudinit::remove_seed(&self.paths().state_dir, name);
        self.forget_snapshots(name);
        let mut table = self.table();
        if remove {
            table.remove(name);
        } else if let Some(d) = table.get_mut(name) {
            d.persistent = false;
            if let Some(live) = &mut d.live {
                live.record.persistent = false;
                // The record only steers recovery; a stale flag makes a
                // restarted daemon look for a definition that is gone.
                let _ = live.record.save(&live.run_dir);
            }
        }
        tracing::info!(domain = name, "undefined");
        Ok(())
    }

    pub async fn start(&self, name: &str) -> Result<DomainInfo, ManagerError> {
        let _guard = self.0.lifecycle.lock().await;
        self.start_locked(name).await?;
        self.info(name)
    }

    /// `oxvirt run`: defines (persistent) or creates (transient) a domain
    /// and starts it; a transient domain that fails to start is forgotten.
    pub async fn run(&self, text: &str, transient: bool) -> Result<DomainInfo, ManagerError> {
        let mut def = DomainDef::parse(text, "run")?;
        self.0.pools.resolve_disks(&def.name, &mut def.disks)?;
        def.validate()?;
        let name = def.name.clone();
        let _guard = self.0.lifecycle.lock().await;
        if self.table().contains_key(&name) {
            return Err(ManagerError::Exists { domain: name });
        }
        if !transient {
            write_atomic(&self.paths().definition(&name), text.as_bytes())?;
        }
        self.table().insert(name.clone(), inactive(def, !transient));
        if let Err(e) = self.start_locked(&name).await {
            if transient {
                self.table().remove(&name);
                crate::cloudinit::remove_seed(&self.paths().state_dir, &name);
            }
            return Err(e);
        }
        self.info(&name)
    }

    async fn start_locked(&self, name: &str) -> Result<(), ManagerError> {
        let managed = self.paths().managed_save(name);
        let incoming = managed
            .exists()
            .then(|| format!("file:{}", managed.display()));
        self.start_from(name, incoming.as_deref()).await?;
        if incoming.is_some() {
            // Restored: the state is consumed (libvirt's managed save too).
            remove_if_exists(&managed);
        }
        Ok(())
    }

    /// Starts a defined domain, booting or (with `incoming`) restoring.
    pub(crate) async fn start_from(
        &self,
        name: &str,
        incoming: Option<&str>,
    ) -> Result<(), ManagerError> {
        self.start_with(name, None, incoming, false).await
    }

    /// Starts a domain with `def` (default: its definition): a saved state
    /// must run with the definition it was saved from. `paused`: its vCPUs
    /// wait for `resume` (the VMM's `--paused`).
    pub(crate) async fn start_with(
        &self,
        name: &str,
        def: Option<DomainDef>,
        incoming: Option<&str>,
        paused: bool,
    ) -> Result<(), ManagerError> {
        let current = self.with(name, |d| {
            if d.state.is_active() {
                return Err(ManagerError::InvalidState {
                    domain: name.to_owned(),
                    state: d.state,
                    action: "start",
                    hint: " (it is already active)",
                });
            }
            Ok(d.def.clone())
        })?;
        let own = def.is_none();
        let mut def = def.unwrap_or(current);
        self.0.pools.resolve_disks(name, &mut def.disks)?;
        def.validate()?;
        if own {
            // Volumes resolve to paths now even if their pool was down at load.
            self.with(name, |d| {
                d.def.disks.clone_from(&def.disks);
                Ok(())
            })?;
        }
        let persistent = self.with(name, |d| Ok(d.persistent))?;
        let (live, waiter) =
            supervise::launch(&self.0.opts, &def, persistent, incoming, paused).await?;
        let pid = live.record.pid;
        self.with(name, |d| {
            d.state = if paused {
                State::Paused
            } else {
                State::Running
            };
            d.reason = match incoming {
                Some(uri) if uri.starts_with("file:") => Reason::Restored,
                Some(_) => Reason::MigratedIn,
                None => Reason::Booted,
            };
            d.exit_code = None;
            d.live = Some(live);
            Ok(())
        })?;
        supervise::watch(self.clone(), name.to_owned(), pid, waiter);
        tracing::info!(domain = name, pid, restored = incoming.is_some(), "started");
        Ok(())
    }

    /// Adds a transient, shut-off domain (restore of an unknown one).
    pub(crate) fn insert_transient(&self, def: DomainDef) {
        self.table().insert(def.name.clone(), inactive(def, false));
    }

    /// Adds a persistent, shut-off domain whose file is written already.
    pub(crate) fn insert_defined(&self, def: DomainDef) {
        self.table().insert(def.name.clone(), inactive(def, true));
    }

    /// Undoes `prepare_incoming` after a failed incoming migration.
    pub(crate) fn forget_incoming(&self, name: &str, persistent: bool) {
        let mut table = self.table();
        if table.get(name).is_some_and(|d| d.live.is_none()) {
            table.remove(name);
            if persistent {
                remove_if_exists(&self.paths().definition(name));
            }
        }
    }

    /// Drops a transient domain that never ran.
    pub(crate) fn forget(&self, name: &str) {
        let mut table = self.table();
        if table
            .get(name)
            .is_some_and(|d| !d.persistent && d.live.is_none())
        {
            table.remove(name);
        }
    }

    /// Asks the guest to power off, then quits the VMM after `timeout`.
    pub async fn shutdown(&self, name: &str, timeout: Duration) -> Result<(), ManagerError> {
        let live = self.request_stop(name, StopRequest::Shutdown, "shut down")?;
        let deadline = Instant::now() + timeout;
        // The guest's chance to power off; a VMM without system_powerdown
        // (no ACPI yet) answers CommandNotFound and is quit at once.
        if vmm_client::execute(&live.api, "system_powerdown")
            .await
            .is_ok()
            && self.wait_exit(name, live.record.pid, deadline).await
        {
            return Ok(());
        }
        if let Err(source) = vmm_client::execute(&live.api, "quit").await {
            if self.is_live_pid(name, live.record.pid) {
                return Err(ManagerError::Vmm {
                    domain: name.to_owned(),
                    source,
                });
            }
        }
        self.expect_exit(name, live.record.pid, "shutdown").await
    }

    /// Kills the VMM at once (virsh destroy).
    pub async fn destroy(&self, name: &str) -> Result<(), ManagerError> {
        let live = self.request_stop(name, StopRequest::Destroy, "destroy")?;
        supervise::kill(&live);
        self.expect_exit(name, live.record.pid, "destroy").await
    }

    pub(crate) fn request_stop(
        &self,
        name: &str,
        request: StopRequest,
        action: &'static str,
    ) -> Result<Live, ManagerError> {
        self.with(name, |d| {
            let state = d.state;
            let live = d.live.as_mut().ok_or(ManagerError::InvalidState {
                domain: name.to_owned(),
                state,
                action,
                hint: "",
            })?;
            live.stop = Some(request);
            Ok(live.clone())
        })
    }

    fn is_live_pid(&self, name: &str, pid: u32) -> bool {
        self.table()
            .get(name)
            .and_then(|d| d.live.as_ref())
            .is_some_and(|l| l.record.pid == pid)
    }

    async fn wait_exit(&self, name: &str, pid: u32, deadline: Instant) -> bool {
        while Instant::now() < deadline {
            if !self.is_live_pid(name, pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        !self.is_live_pid(name, pid)
    }

    pub(crate) async fn expect_exit(
        &self,
        name: &str,
        pid: u32,
        action: &'static str,
    ) -> Result<(), ManagerError> {
        if self
            .wait_exit(name, pid, Instant::now() + STOP_TIMEOUT)
            .await
        {
            Ok(())
        } else {
            Err(ManagerError::Timeout {
                domain: name.to_owned(),
                action,
                timeout: STOP_TIMEOUT,
            })
        }
    }

    pub async fn reboot(&self, name: &str) -> Result<(), ManagerError> {
        let live = self.live(name, "reboot")?;
        self.command(name, &live, "system_reset").await?;
        self.set_state(name, State::Running, Reason::Booted)
    }

    pub async fn suspend(&self, name: &str) -> Result<(), ManagerError> {
        let live = self.live(name, "suspend")?;
        self.command(name, &live, "stop").await?;
        self.set_state(name, State::Paused, Reason::User)
    }

    pub async fn resume(&self, name: &str) -> Result<(), ManagerError> {
        let live = self.live(name, "resume")?;
        self.command(name, &live, "cont").await?;
        self.set_state(name, State::Running, Reason::Unpaused)
    }

    async fn command(&self, name: &str, live: &Live, command: &str) -> Result<(), ManagerError> {
        vmm_client::execute(&live.api, command)
            .await
            .map(drop)
            .map_err(|source| ManagerError::Vmm {
                domain: name.to_owned(),
                source,
            })
    }

    fn set_state(&self, name: &str, state: State, reason: Reason) -> Result<(), ManagerError> {
        self.with(name, |d| {
            if d.live.is_some() {
                d.state = state;
                d.reason = reason;
            }
            Ok(())
        })
    }

    /// Attaches a console session to a running domain's serial port.
    pub(crate) fn console(&self, name: &str) -> Result<Attachment, ManagerError> {
        let live = self.live(name, "attach a console")?;
        let relay = live.console.ok_or_else(|| ManagerError::Console {
            domain: name.to_owned(),
            source: ConsoleError::Closed,
        })?;
        relay.attach().map_err(|source| ManagerError::Console {
            domain: name.to_owned(),
            source,
        })
    }

    /// Marks (or unmarks) a persistent domain for start with the daemon.
    pub fn set_autostart(&self, name: &str, enabled: bool) -> Result<(), ManagerError> {
        let persistent = self.with(name, |d| Ok(d.persistent))?;
        if !persistent {
            return Err(ManagerError::Invalid {
                domain: name.to_owned(),
                field: "autostart",
                reason: "a transient domain cannot autostart".into(),
            });
        }
        let mark = self.paths().autostart_mark(name);
        if enabled {
            write_atomic(&mark, b"")?;
        } else {
            remove_if_exists(&mark);
        }
        Ok(())
    }

    async fn autostart_all(&self) {
        let names: Vec<String> = self
            .table()
            .iter()
            .filter(|(name, d)| d.persistent && !d.state.is_active() && self.autostart(name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            if let Err(e) = self.start(&name).await {
                tracing::warn!(domain = name, error = %e, "autostart failed");
            }
        }
    }

    /// Finds the VMMs a previous daemon started: a live process with the
    /// recorded start time that answers on its control socket is adopted;
    /// anything else is cleaned up.
    async fn recover(&self) {
        let Ok(entries) = std::fs::read_dir(self.paths().running_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let run_dir = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            match Record::load(&run_dir) {
                Ok(record) => self.recover_one(&name, run_dir, record).await,
                Err(e) => {
                    tracing::warn!(domain = name, error = %e, "no usable record; removing the runtime folder");
                    remove_dir(&run_dir);
                }
            }
        }
    }

    async fn recover_one(&self, name: &str, run_dir: PathBuf, record: Record) {
        let api = supervise::api_socket(&run_dir);
        let cgroup = self.open_cgroup(name, &record);
        let status = if is_same_process(record.pid, record.start_ticks) {
            vmm_client::query_status(&api).await.ok()
        } else {
            None
        };
        let Some(status) = status else {
            tracing::info!(
                domain = name,
                pid = record.pid,
                "VMM gone while the daemon was away; cleaning up"
            );
            supervise::cleanup(name, cgroup.as_ref(), &run_dir, &record.taps);
            return;
        };
        let (state, reason) = match status.as_str() {
            "paused" => (State::Paused, Reason::User),
            _ => (State::Running, Reason::Booted),
        };
        let pid = record.pid;
        let start_ticks = record.start_ticks;
        let persistent = record.persistent && self.table().contains_key(name);
        let def = record.def.clone();
        let console = supervise::reconnect_console(&run_dir, &self.paths().console_log(name)).await;
        let live = Live {
            record,
            cgroup,
            stop: None,
            api,
            run_dir,
            console,
        };
        let mut table = self.table();
        let domain = table
            .entry(name.to_owned())
            .or_insert_with(|| inactive(def, persistent));
        domain.persistent = persistent;
        domain.state = state;
        domain.reason = reason;
        domain.live = Some(live);
        drop(table);
        supervise::watch(
            self.clone(),
            name.to_owned(),
            pid,
            supervise::Waiter::Adopted { start_ticks },
        );
        tracing::info!(domain = name, pid, "found running VMM again");
    }

    fn open_cgroup(&self, name: &str, record: &Record) -> Option<DomainCgroup> {
        let placement = self.0.opts.cgroups.as_ref().filter(|_| record.cgroup)?;
        DomainCgroup::open(&placement.layout, &placement.parent, name, record.def.vcpus)
            .map_err(
                |e| tracing::warn!(domain = name, error = %e, "cannot open the domain's cgroups"),
            )
            .ok()
    }

    /// Records how a VMM ended (called by its supervisor).
    pub(crate) fn exited(&self, name: &str, pid: u32, exit: Exit) {
        let Some(live) = self
            .table()
            .get(name)
            .and_then(|d| d.live.clone())
            .filter(|l| l.record.pid == pid)
        else {
            return;
        };
        let (state, reason) = supervise::classify(&live, exit, &self.paths().vmm_log(name));
        supervise::cleanup(name, live.cgroup.as_ref(), &live.run_dir, &live.record.taps);
        tracing::info!(domain = name, pid, %state, %reason, "VMM ended");
        let mut table = self.table();
        let Some(domain) = table.get_mut(name) else {
            return;
        };
        if !domain.persistent {
            table.remove(name);
            crate::cloudinit::remove_seed(&self.paths().state_dir, name);
            return;
        }
        domain.state = state;
        domain.reason = reason;
        domain.exit_code = match exit {
            Exit::Code(code) => Some(code),
            Exit::Signal(_) | Exit::Unknown => None,
        };
        domain.live = None;
    }

    /// Replaces a persistent domain's definition file with `def`.
    pub(crate) fn save_definition(&self, def: &DomainDef) -> Result<(), ManagerError> {
        def.validate()?;
        let text = def.to_toml()?;
        write_atomic(&self.paths().definition(&def.name), text.as_bytes())?;
        Ok(())
    }
}

fn inactive(def: DomainDef, persistent: bool) -> Domain {
    Domain {
        def,
        persistent,
        state: State::ShutOff,
        reason: Reason::Unknown,
        exit_code: None,
        live: None,
    }
}

/// Every readable definition; a broken file is logged and skipped so one
/// bad edit does not take the others down.
fn load_definitions(paths: &Paths, pools: &crate::pool::Pools) -> BTreeMap<String, Domain> {
    let mut table = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(paths.domains_dir()) else {
        return table;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let loaded = std::fs::read_to_string(&path)
            .map_err(|source| ConfigError::Io {
                path: path.clone(),
                source,
            })
            .and_then(|text| DomainDef::parse(&text, &path.display().to_string()));
        match loaded {
            Ok(mut def) if path.file_stem().is_some_and(|s| *s == *def.name) => {
                // A volume whose pool is down resolves at start (with its error then).
                if let Err(e) = pools.resolve_disks(&def.name, &mut def.disks) {
                    tracing::warn!(error = %e, "volume not resolved");
                }
                table.insert(def.name.clone(), inactive(def, true));
            }
            Ok(def) => {
                tracing::warn!(file = %path.display(), name = def.name, "file name and domain name differ; skipped")
            }
            Err(e) => tracing::warn!(error = %e, "definition skipped"),
        }
    }
    table
}

pub(crate) fn remove_if_exists(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove");
        }
    }
}

pub(crate) fn remove_dir(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove");
        }
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
