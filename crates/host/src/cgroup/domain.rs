//! A domain's cgroups: creating, opening, attaching tasks, removing.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::files::{mkdir, read, read_ids, rmdir, write};
use super::layout::{CgroupVersion, Layout, V1Mount, V2Mount};
use super::{CgroupError, Controller};

/// How long [`DomainCgroup::destroy`] waits for killed tasks to leave.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// The child group for the VMM's threads other than vCPUs (libvirt's name).
const EMULATOR: &str = "emulator";

/// Which group of a domain a setting or a thread goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The whole domain (all its threads).
    Domain,
    /// The VMM's threads that are not vCPUs.
    Emulator,
    /// One vCPU thread.
    Vcpu(u32),
}

/// Where domains' groups are made: a path such as `oxvirt`, taken either
/// below the calling process's own cgroup in each hierarchy (libvirt's
/// placement without systemd; it also keeps a confined caller's children
/// inside its own limits) or below each hierarchy's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentGroup {
    path: PathBuf,
    under_own: bool,
}

impl ParentGroup {
    pub fn under_own(path: impl Into<PathBuf>) -> Self {
        ParentGroup {
            path: path.into(),
            under_own: true,
        }
    }

    pub fn at_root(path: impl Into<PathBuf>) -> Self {
        ParentGroup {
            path: path.into(),
            under_own: false,
        }
    }

    /// oxvirt's default parent, `oxvirt`, placed as [`ParentGroup::placed_for`] says.
    pub fn default_for(layout: &Layout) -> Self {
        Self::placed_for(layout, "oxvirt")
    }

    /// `path` below the caller's own group on v1 and hybrid hosts; on
    /// v2-only hosts below the root, since v2 cannot enable controllers
    /// below a group that holds processes (the caller's own).
    pub fn placed_for(layout: &Layout, path: impl Into<PathBuf>) -> Self {
        match layout.version() {
            CgroupVersion::V2 => ParentGroup::at_root(path),
            CgroupVersion::V1 | CgroupVersion::Hybrid => ParentGroup::under_own(path),
        }
    }

    /// The parent's path relative to a mount, given the caller's own path.
    fn relative(&self, own: &Path) -> PathBuf {
        if self.under_own {
            own.join(&self.path)
        } else {
            self.path.clone()
        }
    }

    fn dirs(&self, layout: &Layout) -> Vec<PathBuf> {
        let v1 = layout
            .v1
            .iter()
            .map(|m| m.mount_point.join(self.relative(&m.own)));
        let v2 = layout
            .v2
            .iter()
            .map(|m| m.mount_point.join(self.relative(&m.own)));
        v1.chain(v2).collect()
    }

    /// Removes the parent's folders where no domain is left in them.
    pub fn remove_if_empty(&self, layout: &Layout) -> Result<(), CgroupError> {
        for dir in self.dirs(layout) {
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT | libc::EBUSY | libc::ENOTEMPTY)
                    ) => {}
                Err(source) => return Err(CgroupError::Remove { path: dir, source }),
            }
        }
        Ok(())
    }
}

/// One hierarchy's folder for the domain.
#[derive(Debug, Clone)]
pub(super) struct Group {
    pub dir: PathBuf,
    /// Controllers this group is used for.
    pub controllers: Vec<Controller>,
    pub v2: bool,
    /// Whether the `emulator` and `vcpuN` children exist here.
    pub children: bool,
}

impl Group {
    /// The file that takes thread ids.
    fn threads_file(&self) -> &'static str {
        if self.v2 {
            "cgroup.threads"
        } else {
            "tasks"
        }
    }
}

/// A domain's cgroups in every hierarchy the host has.
#[derive(Debug, Clone)]
pub struct DomainCgroup {
    pub(super) name: String,
    pub(super) vcpus: u32,
    pub(super) groups: Vec<Group>,
}

impl DomainCgroup {
    /// Creates the domain's groups (and the parent where missing), with
    /// `vcpus` vCPU children and an `emulator` child. A leftover group of
    /// the same name is an error; nothing is left behind on failure.
    pub fn create(
        layout: &Layout,
        parent: &ParentGroup,
        name: &str,
        vcpus: u32,
    ) -> Result<Self, CgroupError> {
        let mut domain = Self::plan(layout, parent, name, vcpus)?;
        if let Some(group) = domain.groups.iter().find(|g| g.dir.exists()) {
            return Err(CgroupError::Exists {
                path: group.dir.clone(),
            });
        }
        let result = domain.create_groups(layout, parent);
        if let Err(e) = result {
            domain.remove_dirs_best_effort();
            return Err(e);
        }
        tracing::info!(domain = name, vcpus, "created cgroups");
        Ok(domain)
    }

    /// Opens the groups of a domain created earlier (after a daemon restart).
    pub fn open(
        layout: &Layout,
        parent: &ParentGroup,
        name: &str,
        vcpus: u32,
    ) -> Result<Self, CgroupError> {
        let mut domain = Self::plan(layout, parent, name, vcpus)?;
        for group in &mut domain.groups {
            if !group.dir.is_dir() {
                return Err(CgroupError::Missing {
                    path: group.dir.clone(),
                });
            }
            if group.v2 {
                group.controllers = v2_controllers(&group.dir, &group.controllers)?;
            }
        }
        Ok(domain)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// The domain's folders, one per hierarchy.
    pub fn paths(&self) -> Vec<&Path> {
        self.groups.iter().map(|g| g.dir.as_path()).collect()
    }

    /// The folders and controllers without touching the file system; the v2
    /// group's controllers are the wanted ones until read from the kernel.
    fn plan(
        layout: &Layout,
        parent: &ParentGroup,
        name: &str,
        vcpus: u32,
    ) -> Result<Self, CgroupError> {
        let dir_name = cgroup_dir_name(name)?;
        let mut groups: Vec<Group> = layout
            .v1
            .iter()
            .map(|m| Group {
                dir: m.mount_point.join(parent.relative(&m.own)).join(&dir_name),
                controllers: m.controllers.clone(),
                v2: false,
                children: m.controllers.iter().any(|c| c.per_thread()),
            })
            .collect();
        if let Some(m) = &layout.v2 {
            // On a hybrid host the cgroup2 group only tracks tasks: enabling
            // controllers there could hit the no-internal-process rule.
            let wanted = if layout.v1.is_empty() {
                Controller::ALL.to_vec()
            } else {
                Vec::new()
            };
            groups.push(Group {
                dir: m.mount_point.join(parent.relative(&m.own)).join(&dir_name),
                controllers: wanted,
                v2: true,
                children: true,
            });
        }
        Ok(DomainCgroup {
            name: name.to_owned(),
            vcpus,
            groups,
        })
    }

    fn create_groups(&mut self, layout: &Layout, parent: &ParentGroup) -> Result<(), CgroupError> {
        let child_names = self.child_names();
        for (i, mount) in layout.v1.iter().enumerate() {
            create_v1_parent(mount, &parent.relative(&mount.own))?;
            create_v1_group(&self.groups[i], &child_names)?;
        }
        if let Some(mount) = &layout.v2 {
            let group = self.groups.last_mut().filter(|g| g.v2);
            if let Some(group) = group {
                prepare_v2_parent(mount, &parent.relative(&mount.own), &group.controllers)?;
                group.controllers = create_v2_group(group, &child_names)?;
            }
        }
        Ok(())
    }

    fn child_names(&self) -> Vec<String> {
        std::iter::once(EMULATOR.to_owned())
            .chain((0..self.vcpus).map(|i| format!("vcpu{i}")))
            .collect()
    }

    /// The folder of `scope` in `group`.
    pub(super) fn scope_dir(&self, group: &Group, scope: Scope) -> Result<PathBuf, CgroupError> {
        match scope {
            Scope::Domain => Ok(group.dir.clone()),
            Scope::Emulator => Ok(group.dir.join(EMULATOR)),
            Scope::Vcpu(index) if index < self.vcpus => Ok(group.dir.join(format!("vcpu{index}"))),
            Scope::Vcpu(index) => Err(CgroupError::NoSuchVcpu {
                domain: self.name.clone(),
                index,
                vcpus: self.vcpus,
            }),
        }
    }

    /// The group that `controller` is used through.
    pub(super) fn group(&self, controller: Controller) -> Result<&Group, CgroupError> {
        self.groups
            .iter()
            .find(|g| g.controllers.contains(&controller))
            .ok_or(CgroupError::ControllerMissing {
                domain: self.name.clone(),
                controller,
            })
    }

    /// The folder for `controller` at `scope`; per-thread scopes exist only
    /// for the cpu controllers.
    pub(super) fn dir(
        &self,
        controller: Controller,
        scope: Scope,
    ) -> Result<(&Group, PathBuf), CgroupError> {
        let group = self.group(controller)?;
        if scope != Scope::Domain && !controller.per_thread() {
            return Err(CgroupError::Unsupported {
                domain: self.name.clone(),
                setting: controller.v1_name(),
                detail: format!(
                    "only the whole domain has {} limits, not {scope:?}",
                    controller.v1_name()
                ),
            });
        }
        Ok((group, self.scope_dir(group, scope)?))
    }

    /// Moves process `pid` (all its threads) into the domain, its threads
    /// into the `emulator` group.
    pub fn attach_process(&self, pid: u32) -> Result<(), CgroupError> {
        for group in &self.groups {
            write(&group.dir.join("cgroup.procs"), &pid.to_string())?;
        }
        for tid in process_threads(pid)? {
            self.attach_thread(Scope::Emulator, tid)?;
        }
        tracing::debug!(domain = %self.name, pid, "attached process");
        Ok(())
    }

    /// The files a process writes "0" to, in this order, to move itself
    /// into the domain with its thread in `emulator`: a VMM's child side
    /// does so between fork and exec, so none of its threads ever runs
    /// outside the domain's limits.
    pub fn self_join_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for group in &self.groups {
            files.push(group.dir.join("cgroup.procs"));
            if group.children {
                files.push(group.dir.join(EMULATOR).join(group.threads_file()));
            }
        }
        files
    }

    /// Moves one thread (of a process already in the domain) to `scope`,
    /// e.g. a vCPU thread to its `vcpuN` group.
    pub fn attach_thread(&self, scope: Scope, tid: u32) -> Result<(), CgroupError> {
        for group in self.groups.iter().filter(|g| g.children) {
            let dir = self.scope_dir(group, scope)?;
            write(&dir.join(group.threads_file()), &tid.to_string())?;
        }
        Ok(())
    }

    /// Every thread id in the domain, in any group or hierarchy.
    pub fn tasks(&self) -> Result<Vec<u32>, CgroupError> {
        let mut all = Vec::new();
        for (_, ids) in self.tasks_by_dir()? {
            all.extend(ids);
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    /// The task ids of each folder, children first.
    fn tasks_by_dir(&self) -> Result<Vec<(PathBuf, Vec<u32>)>, CgroupError> {
        let mut out = Vec::new();
        for group in &self.groups {
            for dir in self.group_dirs(group) {
                let file = dir.join(group.threads_file());
                if !dir.exists() {
                    continue;
                }
                out.push((dir, read_ids(&file)?));
            }
        }
        Ok(out)
    }

    /// A group's folders, children before the domain folder.
    fn group_dirs(&self, group: &Group) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = if group.children {
            self.child_names()
                .iter()
                .map(|c| group.dir.join(c))
                .collect()
        } else {
            Vec::new()
        };
        dirs.push(group.dir.clone());
        dirs
    }

    /// Removes the domain's groups. A group that still holds tasks is an
    /// error naming it, and nothing is removed.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for (path, tasks) in self.tasks_by_dir()? {
            if !tasks.is_empty() {
                return Err(CgroupError::NotEmpty { path, tasks });
            }
        }
        for group in &self.groups {
            for dir in self.group_dirs(group) {
                rmdir(&dir)?;
            }
        }
        tracing::info!(domain = %self.name, "removed cgroups");
        Ok(())
    }

    /// Kills every task left in the domain, waits for them to leave, then
    /// removes the groups.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let left = self.tasks_by_dir()?;
            let Some((path, tasks)) = left.into_iter().find(|(_, t)| !t.is_empty()) else {
                return self.remove();
            };
            if Instant::now() > deadline {
                return Err(CgroupError::NotEmpty { path, tasks });
            }
            self.kill_all(&path, &tasks)?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Signals every listed task; on v2 also writes `cgroup.kill`, which
    /// catches tasks forked meanwhile.
    fn kill_all(&self, path: &Path, tasks: &[u32]) -> Result<(), CgroupError> {
        if let Some(group) = self.groups.iter().find(|g| g.v2) {
            let kill_file = group.dir.join("cgroup.kill");
            if kill_file.exists() {
                write(&kill_file, "1")?;
            }
        }
        for &tid in tasks {
            match kill(Pid::from_raw(tid as i32), Signal::SIGKILL) {
                Ok(()) | Err(nix::Error::ESRCH) => {}
                Err(source) => {
                    return Err(CgroupError::Kill {
                        path: path.to_owned(),
                        tid,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    fn remove_dirs_best_effort(&self) {
        for group in &self.groups {
            for dir in self.group_dirs(group) {
                if let Err(e) = rmdir(&dir) {
                    tracing::warn!("cleaning up after a failed create: {e}");
                }
            }
        }
    }
}

/// The folder name for a domain: names that could be mistaken for a
/// cgroup's own files (`cpu.shares`, `cgroup.procs`) or start with `_` or
/// `.` get a `_` in front, as libvirt does.
fn cgroup_dir_name(name: &str) -> Result<String, CgroupError> {
    let bad = |reason| CgroupError::BadName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > 200 {
        return Err(bad("it is longer than 200 bytes"));
    }
    if name.contains(['/', '\0', '\n']) {
        return Err(bad("it contains '/', a newline or a NUL byte"));
    }
    let prefix = name.split_once('.').map(|(p, _)| p);
    let looks_like_a_file = prefix.is_some_and(|p| {
        p == "cgroup"
            || p == "cpuacct"
            || p == "blkio"
            || Controller::ALL.iter().any(|c| Some(p) == c.v2_name())
    });
    if looks_like_a_file || name.starts_with(['_', '.']) {
        Ok(format!("_{name}"))
    } else {
        Ok(name.to_owned())
    }
}

/// Thread ids of a process, from `/proc/PID/task`.
fn process_threads(pid: u32) -> Result<Vec<u32>, CgroupError> {
    let dir = PathBuf::from(format!("/proc/{pid}/task"));
    let entries = std::fs::read_dir(&dir).map_err(|source| CgroupError::Read {
        path: dir.clone(),
        source,
    })?;
    Ok(entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// Creates the parent folders level by level; a new cpuset level gets its
/// parent's CPUs and memory nodes (v1 starts it empty, which refuses tasks).
fn create_v1_parent(mount: &V1Mount, relative: &Path) -> Result<(), CgroupError> {
    let cpuset = mount.controllers.contains(&Controller::Cpuset);
    let mut dir = mount.mount_point.clone();
    for part in relative.components() {
        dir.push(part);
        if mkdir(&dir)? && cpuset {
            inherit_cpuset(&dir)?;
        }
    }
    Ok(())
}

fn create_v1_group(group: &Group, children: &[String]) -> Result<(), CgroupError> {
    let cpuset = group.controllers.contains(&Controller::Cpuset);
    if !mkdir(&group.dir)? {
        return Err(CgroupError::Exists {
            path: group.dir.clone(),
        });
    }
    if cpuset {
        inherit_cpuset(&group.dir)?;
    }
    if group.children {
        for child in children {
            let dir = group.dir.join(child);
            mkdir(&dir)?;
            if cpuset {
                inherit_cpuset(&dir)?;
            }
        }
    }
    Ok(())
}

fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let own = read(&dir.join(file))?;
        if own.trim().is_empty() {
            let inherited = read(&parent.join(file))?;
            write(&dir.join(file), inherited.trim())?;
        }
    }
    Ok(())
}

/// Makes the parent folders and enables the wanted controllers on the way
/// down, so the domain folder gets their files.
fn prepare_v2_parent(
    mount: &V2Mount,
    relative: &Path,
    wanted: &[Controller],
) -> Result<(), CgroupError> {
    let mut dir = mount.mount_point.clone();
    enable_v2_controllers(&dir, wanted)?;
    for part in relative.components() {
        dir.push(part);
        mkdir(&dir)?;
        enable_v2_controllers(&dir, wanted)?;
    }
    Ok(())
}

/// Creates the domain folder and its threaded children; returns the
/// controllers the domain got.
fn create_v2_group(group: &Group, children: &[String]) -> Result<Vec<Controller>, CgroupError> {
    if !mkdir(&group.dir)? {
        return Err(CgroupError::Exists {
            path: group.dir.clone(),
        });
    }
    let controllers = v2_controllers(&group.dir, &group.controllers)?;
    for child in children {
        let dir = group.dir.join(child);
        mkdir(&dir)?;
        write(&dir.join("cgroup.type"), "threaded")?;
    }
    let threaded: Vec<Controller> = controllers
        .iter()
        .copied()
        .filter(|c| matches!(c, Controller::Cpu | Controller::Cpuset | Controller::Pids))
        .collect();
    enable_v2_controllers(&group.dir, &threaded)?;
    Ok(controllers)
}

/// The wanted controllers a v2 folder has (cpuacct is always there: v2's
/// `cpu.stat` is a core file).
fn v2_controllers(dir: &Path, wanted: &[Controller]) -> Result<Vec<Controller>, CgroupError> {
    let available = read(&dir.join("cgroup.controllers"))?;
    let names: Vec<&str> = available.split_whitespace().collect();
    Ok(wanted
        .iter()
        .copied()
        .filter(|c| match c.v2_name() {
            None => true,
            Some(n) => names.contains(&n),
        })
        .collect())
}

/// Enables in `dir/cgroup.subtree_control` those of `wanted` that `dir` has
/// and has not enabled yet.
fn enable_v2_controllers(dir: &Path, wanted: &[Controller]) -> Result<(), CgroupError> {
    let available = read(&dir.join("cgroup.controllers"))?;
    let enabled = read(&dir.join("cgroup.subtree_control"))?;
    let to_enable: Vec<String> = wanted
        .iter()
        .filter_map(|c| c.v2_name())
        .filter(|n| available.split_whitespace().any(|a| a == *n))
        .filter(|n| !enabled.split_whitespace().any(|e| e == *n))
        .map(|n| format!("+{n}"))
        .collect();
    if to_enable.is_empty() {
        return Ok(());
    }
    let file = dir.join("cgroup.subtree_control");
    match write(&file, &to_enable.join(" ")) {
        Err(CgroupError::Write { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
            Err(CgroupError::InternalProcesses {
                path: dir.to_owned(),
            })
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_names_escape_cgroup_file_lookalikes() {
        assert_eq!(cgroup_dir_name("web1").unwrap(), "web1");
        assert_eq!(cgroup_dir_name("web.example").unwrap(), "web.example");
        assert_eq!(cgroup_dir_name("cpu.shares").unwrap(), "_cpu.shares");
        assert_eq!(cgroup_dir_name("cgroup.procs").unwrap(), "_cgroup.procs");
        assert_eq!(cgroup_dir_name("_x").unwrap(), "__x");
        assert_eq!(cgroup_dir_name(".hidden").unwrap(), "_.hidden");
        for bad in ["", "a/b", "a\nb", &"x".repeat(201)] {
            let err = cgroup_dir_name(bad).unwrap_err();
            assert!(matches!(err, CgroupError::BadName { .. }), "{err}");
        }
        assert!(cgroup_dir_name("..").unwrap().starts_with('_'));
    }

    #[test]
    fn plan_places_groups_per_hierarchy() {
        let layout = Layout::parse(
            "1 0 0:1 / /cg/cpu rw - cgroup cgroup rw,cpu,cpuacct\n\
             2 0 0:2 / /cg/memory rw - cgroup cgroup rw,memory\n\
             3 0 0:3 / /cg/unified rw - cgroup2 cgroup2 rw\n",
            "2:memory:/jail\n1:cpu,cpuacct:/\n0::/\n",
        )
        .unwrap();
        let parent = ParentGroup::under_own("oxvirt");
        let d = DomainCgroup::plan(&layout, &parent, "vm1", 2).unwrap();
        let paths: Vec<_> = d.paths().into_iter().map(Path::to_owned).collect();
        assert_eq!(
            paths,
            vec![
                PathBuf::from("/cg/cpu/oxvirt/vm1"),
                PathBuf::from("/cg/memory/jail/oxvirt/vm1"),
                PathBuf::from("/cg/unified/oxvirt/vm1"),
            ]
        );
        let (_, dir) = d.dir(Controller::Cpu, Scope::Vcpu(1)).unwrap();
        assert_eq!(dir, Path::new("/cg/cpu/oxvirt/vm1/vcpu1"));
        assert!(matches!(
            d.dir(Controller::Cpu, Scope::Vcpu(2)),
            Err(CgroupError::NoSuchVcpu { index: 2, .. })
        ));
        assert!(matches!(
            d.dir(Controller::Memory, Scope::Emulator),
            Err(CgroupError::Unsupported { .. })
        ));
        // On a hybrid host the v2 group only tracks tasks.
        assert!(matches!(
            d.dir(Controller::Pids, Scope::Domain),
            Err(CgroupError::ControllerMissing { .. })
        ));
    }
}
