//! A domain's state as the daemon tracks it, and the record a running
//! domain leaves in the runtime folder so a restarted daemon finds it again.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{write_atomic, ConfigError, DomainDef};

/// virsh's domain states (the ones a VMM process can be in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Paused,
    ShutOff,
    Crashed,
}

impl State {
    /// Running or paused: a VMM process exists.
    pub fn is_active(self) -> bool {
        matches!(self, State::Running | State::Paused)
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Running => "running",
            State::Paused => "paused",
            State::ShutOff => "shut off",
            State::Crashed => "crashed",
        })
    }
}

/// Why the domain is in its state (`domstate --reason`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "detail")]
pub enum Reason {
    /// Running since a start.
    Booted,
    /// Running again after resume.
    Unpaused,
    /// Paused by suspend.
    User,
    /// Shut off: the guest powered off, `shutdown`, or the guest's debug-exit.
    Shutdown,
    /// Shut off by `destroy`.
    Destroyed,
    /// Never started since it was defined or since the daemon started.
    Unknown,
    /// Shut off by save or managedsave (its state is in a file).
    Saved,
    /// Running from a saved state (restore, or start after managedsave).
    Restored,
    /// Shut off here: migrated to another host.
    Migrated,
    /// Running here after an incoming migration.
    MigratedIn,
    /// Running from (or shut off by) snapshot-revert.
    FromSnapshot,
    /// Crashed: the kernel's OOM killer killed the VMM.
    Oom,
    /// Crashed: the VMM died of a signal nobody here sent.
    Signal(i32),
    /// Crashed: the VMM reported an error and exited.
    VmmError(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Booted => f.write_str("booted"),
            Reason::Unpaused => f.write_str("unpaused"),
            Reason::User => f.write_str("user"),
            Reason::Shutdown => f.write_str("shutdown"),
            Reason::Destroyed => f.write_str("destroyed"),
            Reason::Unknown => f.write_str("unknown"),
            Reason::Saved => f.write_str("saved"),
            Reason::Restored => f.write_str("restored"),
            Reason::Migrated => f.write_str("migrated"),
            Reason::MigratedIn => f.write_str("migrated in"),
            Reason::FromSnapshot => f.write_str("from snapshot"),
            Reason::Oom => f.write_str("oom"),
            Reason::Signal(n) => write!(f, "signal {n}"),
            Reason::VmmError(msg) => write!(f, "vmm error: {msg}"),
        }
    }
}

/// What a running domain leaves in `run/domains/NAME/record.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub pid: u32,
    /// The process's start time in clock ticks since boot, so a recycled
    /// pid is not mistaken for the VMM.
    pub start_ticks: u64,
    /// The definition the VMM was started with.
    pub def: DomainDef,
    pub persistent: bool,
    pub vcpu_tids: Vec<u32>,
    /// The cgroup's OOM-kill count at start (a rise means an OOM kill).
    pub oom_base: u64,
    /// Unix seconds.
    pub started_at: u64,
    pub cgroup: bool,
    /// The taps the daemon made for the NICs, in NIC order.
    #[serde(default)]
    pub taps: Vec<String>,
}

impl Record {
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("record.json")
    }

    pub fn save(&self, run_dir: &Path) -> Result<(), ConfigError> {
        let data = serde_json::to_vec_pretty(self).map_err(|e| ConfigError::Io {
            path: Self::path(run_dir),
            source: e.into(),
        })?;
        write_atomic(&Self::path(run_dir), &data)
    }

    pub fn load(run_dir: &Path) -> Result<Self, ConfigError> {
        let path = Self::path(run_dir);
        let data = std::fs::read(&path).map_err(|source| ConfigError::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&data).map_err(|e| ConfigError::Io {
            path,
            source: e.into(),
        })
    }
}

/// The start time (field 22 of `/proc/PID/stat`) of a live process.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it do not.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // after_name starts at field 3 (state); field 22 is 19 further on.
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The process `pid` is alive and is the one that started at `start_ticks`.
pub fn is_same_process(pid: u32, start_ticks: u64) -> bool {
    process_start_ticks(pid) == Some(start_ticks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_recognised() {
        let me = std::process::id();
        let ticks = process_start_ticks(me).expect("own stat");
        assert!(is_same_process(me, ticks));
        assert!(!is_same_process(me, ticks + 1));
    }

    #[test]
    fn reasons_read_like_virsh() {
        assert_eq!(Reason::Signal(9).to_string(), "signal 9");
        assert_eq!(State::ShutOff.to_string(), "shut off");
    }
}
