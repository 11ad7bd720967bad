//! One `oxvirt vmm` process per running domain: launching it inside the
//! domain's cgroups, watching it end, and telling a clean stop from a crash.

use std::ffi::{CStr, CString};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use host::cgroup::{DomainCgroup, Scope};
use nix::sys::signal::{kill as send_signal, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::config::DomainDef;
use crate::console::ConsoleRelay;
use crate::domain::{is_same_process, process_start_ticks, Reason, Record, State};
use crate::error::ManagerError;
use crate::manager::{
    remove_dir, remove_if_exists, unix_now, Live, Manager, ManagerOptions, StopRequest,
};
use crate::{cloudinit, network, tune, vmm_client};

/// How a VMM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// A VMM adopted after a daemon restart is not our child: its status
    /// is not ours to read.
    Unknown,
}

/// How the supervisor learns of the end.
pub(crate) enum Waiter {
    Child(Child),
    Adopted { start_ticks: u64 },
}

const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an incoming migration may take.
const INCOMING_TIMEOUT: Duration = Duration::from_secs(600);

pub(crate) fn api_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("api.sock")
}

/// The VMM's serial port, which the daemon relays (see `console`).
pub(crate) fn serial_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("serial.sock")
}

/// The `oxvirt vmm` arguments for a definition whose NICs got `taps`.
/// `incoming`: a migration URI (`file:` a saved state) to take the
/// guest from instead of booting. `seed`: the cloud-init seed image.
pub fn vmm_args(
    def: &DomainDef,
    run_dir: &Path,
    taps: &[String],
    incoming: Option<&str>,
    seed: Option<&Path>,
) -> Vec<String> {
    let mut args = vec![
        "vmm".to_owned(),
        "--kernel".to_owned(),
        def.kernel.display().to_string(),
        "--memory".to_owned(),
        format!("{}M", def.memory.0 >> 20),
        "--vcpus".to_owned(),
        def.vcpus.to_string(),
        "--api".to_owned(),
        api_socket(run_dir).display().to_string(),
        "--serial".to_owned(),
        format!("unix:{}", serial_socket(run_dir).display()),
    ];
    if let Some(initrd) = &def.initrd {
        args.extend(["--initrd".to_owned(), initrd.display().to_string()]);
    }
    if let Some(cmdline) = &def.cmdline {
        args.extend(["--cmdline".to_owned(), cmdline.clone()]);
    }
    if let Some(profile) = &def.cpu_profile {
        args.extend(["--cpu-profile".to_owned(), profile.clone()]);
    }
    for (i, disk) in def.disks.iter().enumerate() {
        args.extend(["--disk".to_owned(), disk.vmm_flag(i)]);
    }
    if let Some(seed) = seed {
        args.extend(["--disk".to_owned(), cloudinit::seed_disk_flag(seed)]);
    }
    for (i, (nic, tap)) in def.nics.iter().zip(taps).enumerate() {
        args.extend(["--net".to_owned(), nic.vmm_flag(&def.name, i, tap)]);
    }
    if def.rng {
        args.push("--rng".to_owned());
    }
    if let Some(uri) = incoming {
        args.extend(["--incoming".to_owned(), uri.to_owned()]);
    }
    args
}

/// Creates the cgroups, spawns the VMM, moves it and its vCPU threads into
/// place and records it. On failure nothing is left running. `paused`: the
/// guest does not run until `cont`.
pub(crate) async fn launch(
    opts: &ManagerOptions,
    def: &DomainDef,
    persistent: bool,
    incoming: Option<&str>,
    paused: bool,
) -> Result<(Live, Waiter), ManagerError> {
    let name = def.name.as_str();
    let paths = &opts.paths;
    let seed = cloudinit::write_seed(&paths.state_dir, name, def.cloud_init.as_ref())?;
    let run_dir = paths.domain_run_dir(name);
    remove_dir(&run_dir);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ManagerError::Io { path, source }
    };
    std::fs::create_dir_all(&run_dir).map_err(io(&run_dir))?;
    let cgroup = match create_cgroup(opts, def) {
        Ok(cg) => cg,
        Err(e) => {
            remove_dir(&run_dir);
            return Err(e);
        }
    };
    std::fs::create_dir_all(paths.log_dir()).map_err(io(&paths.log_dir()))?;
    let taps = match network::create_taps(&paths.state_dir, name, &def.nics) {
        Ok(taps) => taps,
        Err(e) => {
            abandon(name, None, cgroup.as_ref(), &run_dir, &[]).await;
            return Err(e);
        }
    };
    let api = api_socket(&run_dir);
    let vmm_log_path = paths.vmm_log(name);
    let spawned = spawn(
        opts,
        def,
        (&run_dir, incoming, seed.as_deref(), paused),
        &taps,
        cgroup.as_ref(),
        &vmm_log_path,
    );
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            abandon(name, None, cgroup.as_ref(), &run_dir, &taps).await;
            return Err(e);
        }
    };
    // Taken now: once a quick guest's VMM is reaped, the child has no id.
    let pid = child.id().unwrap_or_default();
    let start_ticks = process_start_ticks(pid).unwrap_or_default();
    let console_log = paths.console_log(name);
    // A restored guest's console goes on in the same log.
    if incoming.is_none() {
        remove_if_exists(&console_log);
    }
    let settled = async {
        let console =
            connect_console(def, &mut child, &run_dir, &console_log, &vmm_log_path).await?;
        // A VMM takes commands once its guest is in: for a migration that
        // is when the source has sent it.
        let timeout = match incoming {
            Some(_) => INCOMING_TIMEOUT,
            None => START_TIMEOUT,
        };
        let tids = settle(
            def,
            &mut child,
            cgroup.as_ref(),
            &api,
            &vmm_log_path,
            timeout,
        )
        .await?;
        Ok::<_, ManagerError>((console, tids))
    };
    match settled.await {
        Ok((console, vcpu_tids)) => {
            let record = Record {
                pid,
                start_ticks,
                def: def.clone(),
                persistent,
                vcpu_tids,
                oom_base: cgroup
                    .as_ref()
                    .and_then(|cg| cg.stats().ok())
                    .and_then(|s| s.oom_kills)
                    .unwrap_or(0),
                started_at: unix_now(),
                cgroup: cgroup.is_some(),
                taps: taps.clone(),
            };
            if let Err(e) = record.save(&run_dir) {
                abandon(name, Some(child), cgroup.as_ref(), &run_dir, &taps).await;
                return Err(e.into());
            }
            Ok((
                Live {
                    record,
                    cgroup,
                    stop: None,
                    api,
                    run_dir,
                    console: Some(console),
                },
                Waiter::Child(child),
            ))
        }
        Err(e) => {
            abandon(name, Some(child), cgroup.as_ref(), &run_dir, &taps).await;
            Err(e)
        }
    }
}

/// Becomes the client of the VMM's serial socket as soon as it exists.
async fn connect_console(
    def: &DomainDef,
    child: &mut Child,
    run_dir: &Path,
    console_log: &Path,
    vmm_log: &Path,
) -> Result<ConsoleRelay, ManagerError> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut exited = None;
    let connected = ConsoleRelay::connect(&serial_socket(run_dir), console_log, || {
        match child.try_wait() {
            Ok(Some(status)) => {
                exited = Some(status);
                false
            }
            _ => Instant::now() < deadline,
        }
    })
    .await;
    connected.map_err(|e| ManagerError::StartFailed {
        domain: def.name.clone(),
        detail: match exited {
            Some(status) => format!("the VMM exited ({status}): {}", log_tail(vmm_log)),
            None => e.to_string(),
        },
    })
}

/// Connects the console relay of a VMM found again after a restart.
pub(crate) async fn reconnect_console(run_dir: &Path, console_log: &Path) -> Option<ConsoleRelay> {
    ConsoleRelay::connect(&serial_socket(run_dir), console_log, || false)
        .await
        .map_err(|e| tracing::warn!(error = %e, "no console for the VMM found again"))
        .ok()
}

/// Spawns the VMM; its child side joins the domain's cgroups before exec.
fn spawn(
    opts: &ManagerOptions,
    def: &DomainDef,
    (run_dir, incoming, seed, paused): (&Path, Option<&str>, Option<&Path>, bool),
    taps: &[String],
    cgroup: Option<&DomainCgroup>,
    vmm_log_path: &Path,
) -> Result<Child, ManagerError> {
    let name = def.name.as_str();
    // Truncated per run, so its last line is this run's.
    let vmm_log = std::fs::File::create(vmm_log_path).map_err(|source| ManagerError::Io {
        path: vmm_log_path.to_owned(),
        source,
    })?;
    let join: Vec<CString> = cgroup
        .map(|cg| cg.self_join_files())
        .unwrap_or_default()
        .iter()
        .filter_map(|f| CString::new(f.as_os_str().as_bytes()).ok())
        .collect();
    let mut command = Command::new(&opts.vmm_binary);
    command
        .args(vmm_args(def, run_dir, taps, incoming, seed))
        .args(paused.then_some("--paused"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(vmm_log))
        // Its own process group: a Ctrl-C or SIGTERM meant for the daemon
        // does not reach the VMs.
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec; it only
    // calls `join_cgroup`, which makes async-signal-safe calls on memory
    // prepared before the fork.
    unsafe {
        command.pre_exec(move || join.iter().try_for_each(|file| join_cgroup(file)));
    }
    command.spawn().map_err(|source| ManagerError::Spawn {
        domain: name.to_owned(),
        binary: opts.vmm_binary.clone(),
        source,
    })
}

/// Writes "0" (the writing process) to a cgroup membership file.
fn join_cgroup(file: &CStr) -> std::io::Result<()> {
    // SAFETY: `file` is NUL-terminated and outlives the calls; open, write
    // and close are async-signal-safe and touch only the static buffer.
    unsafe {
        let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(error);
        }
    }
    Ok(())
}

fn create_cgroup(
    opts: &ManagerOptions,
    def: &DomainDef,
) -> Result<Option<DomainCgroup>, ManagerError> {
    let name = def.name.as_str();
    let Some(placement) = &opts.cgroups else {
        if def.resources != Default::default() {
            return Err(ManagerError::NoCgroups {
                domain: name.to_owned(),
                what: "[resources]",
            });
        }
        return Ok(None);
    };
    let tune_err = |source| ManagerError::Tune {
        domain: name.to_owned(),
        source,
    };
    // A leftover from a VMM that died with a previous daemon.
    if let Ok(stale) = DomainCgroup::open(&placement.layout, &placement.parent, name, def.vcpus) {
        stale.destroy().map_err(|e| tune_err(e.into()))?;
    }
    let cg = DomainCgroup::create(&placement.layout, &placement.parent, name, def.vcpus)
        .map_err(|e| tune_err(e.into()))?;
    if let Err(e) = tune::apply_domain(&cg, &def.resources) {
        // Best effort: the group is empty and ours.
        let _ = cg.destroy();
        return Err(tune_err(e));
    }
    Ok(Some(cg))
}

/// Puts the fresh VMM into its cgroups and waits for its control socket.
async fn settle(
    def: &DomainDef,
    child: &mut Child,
    cgroup: Option<&DomainCgroup>,
    api: &Path,
    vmm_log: &Path,
    timeout: Duration,
) -> Result<Vec<u32>, ManagerError> {
    let name = def.name.as_str();
    let failed = |detail: String| ManagerError::StartFailed {
        domain: name.to_owned(),
        detail,
    };
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return match vmm_error(vmm_log) {
                Some(message) => Err(failed(format!("the VMM exited ({status}): {message}"))),
                // The guest ran and ended already; the supervisor records it.
                None => Ok(Vec::new()),
            };
        }
        if vmm_client::query_status(api).await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            return Err(failed(format!(
                "no answer on the control socket {} after {timeout:?}",
                api.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match place_vcpus(def, cgroup, api).await {
        Ok(tids) => Ok(tids),
        // A guest that finished while we placed its threads is no failure.
        Err(_) if matches!(child.try_wait(), Ok(Some(_))) && vmm_error(vmm_log).is_none() => {
            Ok(Vec::new())
        }
        Err(e) => Err(e),
    }
}

/// Moves each vCPU thread into its group and applies per-vCPU settings.
async fn place_vcpus(
    def: &DomainDef,
    cgroup: Option<&DomainCgroup>,
    api: &Path,
) -> Result<Vec<u32>, ManagerError> {
    let name = def.name.as_str();
    let tune_err = |source| ManagerError::Tune {
        domain: name.to_owned(),
        source,
    };
    let tids = vmm_client::vcpu_threads(api)
        .await
        .map_err(|source| ManagerError::Vmm {
            domain: name.to_owned(),
            source,
        })?;
    if let Some(cg) = cgroup {
        for (vcpu, tid) in tids.iter().enumerate() {
            cg.attach_thread(Scope::Vcpu(vcpu as u32), *tid)
                .map_err(|e| tune_err(e.into()))?;
        }
        tune::apply_vcpus(cg, def).map_err(tune_err)?;
    }
    tune::apply_vcpu_sched(cgroup, def, &tids).map_err(tune_err)?;
    Ok(tids)
}

/// Undoes a failed start: kills the VMM, removes its cgroups and folder.
async fn abandon(
    name: &str,
    child: Option<Child>,
    cgroup: Option<&DomainCgroup>,
    run_dir: &Path,
    taps: &[String],
) {
    if let Some(mut child) = child {
        // Best effort: it may be gone already.
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    cleanup(name, cgroup, run_dir, taps);
}

/// Removes what a VMM leaves behind: its cgroups, taps and runtime folder.
pub(crate) fn cleanup(name: &str, cgroup: Option<&DomainCgroup>, run_dir: &Path, taps: &[String]) {
    network::delete_taps(taps);
    if let Some(cg) = cgroup {
        if let Err(e) = cg.destroy() {
            tracing::warn!(domain = name, error = %e, "cannot remove the domain's cgroups");
        }
    }
    remove_dir(run_dir);
}

/// SIGKILL to the domain's VMM, if it is still the process we started.
pub(crate) fn kill(live: &Live) {
    if is_same_process(live.record.pid, live.record.start_ticks) {
        if let Ok(pid) = i32::try_from(live.record.pid) {
            if let Err(e) = send_signal(Pid::from_raw(pid), Signal::SIGKILL) {
                tracing::warn!(pid, error = %e, "cannot kill the VMM");
            }
        }
    }
}

/// Watches the VMM until it ends, then tells the manager.
pub(crate) fn watch(manager: Manager, name: String, pid: u32, waiter: Waiter) {
    tokio::spawn(async move {
        let exit = match waiter {
            Waiter::Child(mut child) => match child.wait().await {
                Ok(status) => exit_of(status),
                Err(_) => Exit::Unknown,
            },
            Waiter::Adopted { start_ticks } => {
                while is_same_process(pid, start_ticks) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Exit::Unknown
            }
        };
        manager.exited(&name, pid, exit);
    });
}

fn exit_of(status: std::process::ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit::Code(code),
        (None, Some(signal)) => Exit::Signal(signal),
        (None, None) => Exit::Unknown,
    }
}

/// The state a domain lands in when its VMM ends.
pub(crate) fn classify(live: &Live, exit: Exit, vmm_log: &Path) -> (State, Reason) {
    match live.stop {
        Some(StopRequest::Destroy) => return (State::ShutOff, Reason::Destroyed),
        Some(StopRequest::Shutdown) => return (State::ShutOff, Reason::Shutdown),
        Some(StopRequest::Save) => return (State::ShutOff, Reason::Saved),
        Some(StopRequest::Migrate) => return (State::ShutOff, Reason::Migrated),
        None => {}
    }
    let oom_kills = live
        .cgroup
        .as_ref()
        .and_then(|cg| cg.stats().ok())
        .and_then(|s| s.oom_kills);
    if oom_kills.is_some_and(|n| n > live.record.oom_base) {
        return (State::Crashed, Reason::Oom);
    }
    match exit {
        Exit::Signal(signal) => (State::Crashed, Reason::Signal(signal)),
        Exit::Code(0) => (State::ShutOff, Reason::Shutdown),
        // The VMM prints "oxvirt: <error>" before a failure exit; a guest's
        // debug-exit status leaves no such line.
        Exit::Code(_) => match vmm_error(vmm_log) {
            Some(message) => (State::Crashed, Reason::VmmError(message)),
            None => (State::ShutOff, Reason::Shutdown),
        },
        Exit::Unknown => (State::ShutOff, Reason::Unknown),
    }
}

fn vmm_error(vmm_log: &Path) -> Option<String> {
    let tail = log_tail(vmm_log);
    let last = tail.lines().last()?;
    last.strip_prefix("oxvirt: ").map(str::to_owned)
}

/// The last few hundred bytes the VMM wrote to its log.
fn log_tail(path: &Path) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(512);
    let mut text = String::new();
    if file.seek(SeekFrom::Start(start)).is_ok() {
        // Best effort: the log only adds detail to an error.
        let _ = file.take(512).read_to_string(&mut text);
    }
    text.trim().to_owned()
}
