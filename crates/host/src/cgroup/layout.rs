//! Where the cgroup hierarchies are mounted and where the calling process
//! sits in each, read from `/proc/self/mountinfo` and `/proc/self/cgroup`.

use std::path::{Path, PathBuf};

use super::{CgroupError, Controller};

/// Which cgroup interface the host offers for resource control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Only v1 controller hierarchies.
    V1,
    /// One cgroup2 hierarchy holding the controllers.
    V2,
    /// v1 controllers plus a cgroup2 mount (systemd's "hybrid" setup); limits
    /// go through v1, the cgroup2 group tracks the domain's processes.
    Hybrid,
}

/// One v1 hierarchy: a mount holding one or more controllers.
#[derive(Debug, Clone, PartialEq)]
pub struct V1Mount {
    pub controllers: Vec<Controller>,
    pub mount_point: PathBuf,
    /// The caller's cgroup in this hierarchy, relative to the mount point.
    pub own: PathBuf,
}

/// The cgroup2 mount.
#[derive(Debug, Clone, PartialEq)]
pub struct V2Mount {
    pub mount_point: PathBuf,
    /// The caller's cgroup, relative to the mount point.
    pub own: PathBuf,
}

/// The host's cgroup mounts.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub v1: Vec<V1Mount>,
    pub v2: Option<V2Mount>,
}

struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
    super_opts: String,
}

impl Layout {
    /// Reads this host's mounts and this process's cgroups.
    pub fn detect() -> Result<Self, CgroupError> {
        let mountinfo = read_proc("/proc/self/mountinfo")?;
        let own = read_proc("/proc/self/cgroup")?;
        Self::parse(&mountinfo, &own)
    }

    /// Builds the layout from the text of `/proc/self/mountinfo` and
    /// `/proc/self/cgroup`.
    pub fn parse(mountinfo: &str, self_cgroup: &str) -> Result<Self, CgroupError> {
        let mounts = mountinfo
            .lines()
            .enumerate()
            .map(|(i, line)| parse_mount(line).ok_or(i + 1))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|line| CgroupError::Parse {
                path: PathBuf::from("/proc/self/mountinfo"),
                reason: format!("line {line} is malformed"),
            })?;
        let mut v1 = Vec::new();
        let mut v2 = None;
        for m in mounts {
            if m.fstype == "cgroup2" && v2.is_none() {
                let own = own_path(self_cgroup, |c| c.is_empty(), &m.root);
                v2 = Some(V2Mount {
                    mount_point: m.point,
                    own,
                });
            } else if m.fstype == "cgroup" {
                let opts: Vec<&str> = m.super_opts.split(',').collect();
                let controllers: Vec<Controller> =
                    opts.iter().filter_map(|o| Controller::from_v1(o)).collect();
                if controllers.is_empty() || v1_has_any(&v1, &controllers) {
                    continue;
                }
                let name = controllers[0].v1_name();
                let own = own_path(self_cgroup, |c| c.split(',').any(|x| x == name), &m.root);
                v1.push(V1Mount {
                    controllers,
                    mount_point: m.point,
                    own,
                });
            }
        }
        if v1.is_empty() && v2.is_none() {
            return Err(CgroupError::NoHierarchy);
        }
        Ok(Layout { v1, v2 })
    }

    pub fn version(&self) -> CgroupVersion {
        match (self.v1.is_empty(), self.v2.is_some()) {
            (true, _) => CgroupVersion::V2,
            (false, true) => CgroupVersion::Hybrid,
            (false, false) => CgroupVersion::V1,
        }
    }

    /// The v1 mount holding `controller`, if any.
    pub fn v1_mount(&self, controller: Controller) -> Option<&V1Mount> {
        self.v1.iter().find(|m| m.controllers.contains(&controller))
    }
}

fn v1_has_any(v1: &[V1Mount], controllers: &[Controller]) -> bool {
    v1.iter()
        .any(|m| m.controllers.iter().any(|c| controllers.contains(c)))
}

fn read_proc(path: &str) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: PathBuf::from(path),
        source,
    })
}

/// `36 25 0:31 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu`
fn parse_mount(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let right: Vec<&str> = right.split(' ').collect();
    Some(Mount {
        root: unescape(left.get(3)?),
        point: PathBuf::from(unescape(left.get(4)?)),
        fstype: (*right.first()?).to_owned(),
        super_opts: (*right.get(2)?).to_owned(),
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The caller's path in the hierarchy whose `/proc/self/cgroup` controller
/// field matches, made relative to the mount's root (inside containers the
/// mount root is the container's own cgroup).
fn own_path(self_cgroup: &str, matches: impl Fn(&str) -> bool, mount_root: &str) -> PathBuf {
    let path = self_cgroup
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            matches(controllers).then_some(path)
        })
        .next()
        .unwrap_or("/");
    let relative = Path::new(path)
        .strip_prefix(mount_root)
        .unwrap_or(Path::new(""));
    relative.strip_prefix("/").unwrap_or(relative).to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_SELF: &str = "\
9:name=systemd:/
4:memory:/process_api/abc
3:cpuset:/
1:cpu,cpuacct:/user.slice
0::/user.slice/session-1.scope
";

    #[test]
    fn hybrid_host() {
        let layout = Layout::parse(HYBRID, HYBRID_SELF).unwrap();
        assert_eq!(layout.version(), CgroupVersion::Hybrid);
        let cpu = layout.v1_mount(Controller::Cpuacct).unwrap();
        assert_eq!(cpu.controllers, vec![Controller::Cpu, Controller::Cpuacct]);
        assert_eq!(cpu.mount_point, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(cpu.own, Path::new("user.slice"));
        let mem = layout.v1_mount(Controller::Memory).unwrap();
        assert_eq!(mem.own, Path::new("process_api/abc"));
        assert_eq!(
            layout.v1_mount(Controller::Cpuset).unwrap().own,
            Path::new("")
        );
        assert!(layout.v1_mount(Controller::Pids).is_none());
        let v2 = layout.v2.unwrap();
        assert_eq!(v2.mount_point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(v2.own, Path::new("user.slice/session-1.scope"));
    }

    #[test]
    fn v2_only_host_in_a_container() {
        let info = "30 23 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let layout = Layout::parse(info, "0::/docker/abc/init\n").unwrap();
        assert_eq!(layout.version(), CgroupVersion::V2);
        assert_eq!(layout.v2.unwrap().own, Path::new("init"));
    }

    #[test]
    fn escaped_mount_points() {
        let info = "30 23 0:26 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";
        let layout = Layout::parse(info, "0::/\n").unwrap();
        assert_eq!(layout.v2.unwrap().mount_point, Path::new("/mnt/cg two"));
    }

    #[test]
    fn no_cgroups_or_garbage_is_an_error() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n";
        assert!(matches!(
            Layout::parse(info, ""),
            Err(CgroupError::NoHierarchy)
        ));
        let err = Layout::parse("garbage\n", "").unwrap_err();
        assert!(err.to_string().contains("/proc/self/mountinfo"), "{err}");
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
