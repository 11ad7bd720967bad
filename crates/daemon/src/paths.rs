//! Where the daemon keeps definitions, runtime records and its socket, in
//! system mode (root, like `qemu:///system`) or session mode (a user, like
//! `qemu:///session`). Tests point everything at a temporary folder.

use std::path::{Path, PathBuf};

/// Errors finding the daemon's folders.
#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error("session mode needs $XDG_STATE_HOME or $HOME to place the state folder")]
    NoHome,
}

/// System or session instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    System,
    Session,
}

impl Mode {
    /// System mode for root, session mode for everyone else.
    pub fn for_current_user() -> Self {
        if nix::unistd::geteuid().is_root() {
            Mode::System
        } else {
            Mode::Session
        }
    }
}

/// The daemon's folders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Persistent state: `domains/NAME.toml`, `autostart/NAME`, `log/NAME.log`,
    /// `pools/NAME.toml`, `images/` (the default pool).
    pub state_dir: PathBuf,
    /// Runtime state, gone at reboot: the API socket and one folder per
    /// running domain (VMM sockets and its record).
    pub run_dir: PathBuf,
}

impl Paths {
    /// The default folders of `mode`; `$OXVIRT_STATE_DIR` and
    /// `$OXVIRT_RUN_DIR` override them.
    pub fn for_mode(mode: Mode) -> Result<Self, PathsError> {
        let (state, run) = match mode {
            Mode::System => (
                PathBuf::from("/var/lib/oxvirt"),
                PathBuf::from("/run/oxvirt"),
            ),
            Mode::Session => (session_state_dir()?, session_run_dir()),
        };
        Ok(Paths {
            state_dir: env_path("OXVIRT_STATE_DIR").unwrap_or(state),
            run_dir: env_path("OXVIRT_RUN_DIR").unwrap_or(run),
        })
    }

    /// Both folders under one root (tests).
    pub fn under(root: &Path) -> Self {
        Paths {
            state_dir: root.join("state"),
            run_dir: root.join("run"),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("oxvirtd.sock")
    }

    pub fn domains_dir(&self) -> PathBuf {
        self.state_dir.join("domains")
    }

    pub fn definition(&self, name: &str) -> PathBuf {
        self.domains_dir().join(format!("{name}.toml"))
    }

    pub fn autostart_dir(&self) -> PathBuf {
        self.state_dir.join("autostart")
    }

    pub fn autostart_mark(&self, name: &str) -> PathBuf {
        self.autostart_dir().join(name)
    }

    pub fn log_dir(&self) -> PathBuf {
        self.state_dir.join("log")
    }

    /// A domain's managed save (managedsave; the next start restores it).
    pub fn managed_save(&self, name: &str) -> PathBuf {
        self.state_dir.join("save").join(format!("{name}.state"))
    }

    /// The guest's serial output.
    pub fn console_log(&self, name: &str) -> PathBuf {
        self.log_dir().join(format!("{name}.log"))
    }

    /// The VMM's own messages (stderr).
    pub fn vmm_log(&self, name: &str) -> PathBuf {
        self.log_dir().join(format!("{name}.vmm.log"))
    }

    /// Storage pool definitions (`pools/NAME.toml`).
    pub fn pools_dir(&self) -> PathBuf {
        self.state_dir.join("pools")
    }

    /// The marks of active storage pools.
    pub fn pools_run_dir(&self) -> PathBuf {
        self.run_dir.join("pools")
    }

    /// The `default` storage pool's folder (libvirt's /var/lib/libvirt/images).
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    pub fn running_dir(&self) -> PathBuf {
        self.run_dir.join("domains")
    }

    /// The runtime folder of one running domain.
    pub fn domain_run_dir(&self, name: &str) -> PathBuf {
        self.running_dir().join(name)
    }
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn session_state_dir() -> Result<PathBuf, PathsError> {
    if let Some(dir) = env_path("XDG_STATE_HOME") {
        return Ok(dir.join("oxvirt"));
    }
    let home = env_path("HOME").ok_or(PathsError::NoHome)?;
    Ok(home.join(".local/state/oxvirt"))
}

fn session_run_dir() -> PathBuf {
    match env_path("XDG_RUNTIME_DIR") {
        Some(dir) => dir.join("oxvirt"),
        None => std::env::temp_dir().join(format!("oxvirt-{}", nix::unistd::geteuid())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_under_a_root() {
        let p = Paths::under(Path::new("/t"));
        assert_eq!(p.socket(), PathBuf::from("/t/run/oxvirtd.sock"));
        assert_eq!(
            p.definition("web"),
            PathBuf::from("/t/state/domains/web.toml")
        );
        assert_eq!(p.domain_run_dir("web"), PathBuf::from("/t/run/domains/web"));
    }
}
