//! The manager's errors, each naming the domain (and the field where one is
//! at fault); the API turns them into `{code, message, domain, field}`.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::ConfigError;
use crate::domain::State;
use crate::tune::TuneError;
use crate::vmm_client::VmmClientError;

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("domain {domain:?} not found")]
    NotFound { domain: String },
    #[error("domain {domain:?} already exists")]
    Exists { domain: String },
    #[error("domain {domain:?} is {state}: cannot {action}{hint}")]
    InvalidState {
        domain: String,
        state: State,
        action: &'static str,
        hint: &'static str,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("domain {domain:?}: cgroups: {source}")]
    Tune { domain: String, source: TuneError },
    #[error("domain {domain:?}: {source}")]
    Vmm {
        domain: String,
        source: VmmClientError,
    },
    #[error("domain {domain:?}: cannot run the VMM {binary}: {source}")]
    Spawn {
        domain: String,
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("domain {domain:?}: the VMM did not start: {detail}")]
    StartFailed { domain: String, detail: String },
    #[error("domain {domain:?}: {action} did not finish within {timeout:?}")]
    Timeout {
        domain: String,
        action: &'static str,
        timeout: Duration,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("domain {domain:?}: {field}: {reason}")]
    Invalid {
        domain: String,
        field: &'static str,
        reason: String,
    },
    #[error("domain {domain:?}: network: {source}")]
    Network {
        domain: String,
        source: host::net::NetError,
    },
    #[error("domain {domain:?}: console: {source}")]
    Console {
        domain: String,
        source: crate::console::ConsoleError,
    },
    #[error("domain {domain:?}: {what} needs cgroups, and this daemon runs without them (start it as root, without --no-cgroups)")]
    NoCgroups { domain: String, what: &'static str },
}

impl ManagerError {
    /// A stable, machine-readable error code.
    pub fn code(&self) -> &'static str {
        match self {
            ManagerError::NotFound { .. } => "not_found",
            ManagerError::Exists { .. } => "exists",
            ManagerError::InvalidState { .. } => "invalid_state",
            ManagerError::Config(ConfigError::Parse { .. }) => "parse_error",
            ManagerError::Config(ConfigError::Invalid { .. }) | ManagerError::Invalid { .. } => {
                "invalid_argument"
            }
            ManagerError::Config(_) | ManagerError::Io { .. } => "io_error",
            ManagerError::Tune { .. } => "cgroup_error",
            ManagerError::Network { .. } => "network_error",
            ManagerError::Console { .. } => "console_error",
            ManagerError::Vmm { .. } => "vmm_error",
            ManagerError::Spawn { .. } | ManagerError::StartFailed { .. } => "start_failed",
            ManagerError::Timeout { .. } => "timeout",
            ManagerError::NoCgroups { .. } => "unsupported",
        }
    }

    /// The HTTP status that goes with the code.
    pub fn http_status(&self) -> u16 {
        match self {
            ManagerError::NotFound { .. } => 404,
            ManagerError::Exists { .. }
            | ManagerError::InvalidState { .. }
            | ManagerError::Console { .. } => 409,
            ManagerError::Config(ConfigError::Parse { .. } | ConfigError::Invalid { .. })
            | ManagerError::Invalid { .. } => 400,
            ManagerError::NoCgroups { .. } => 501,
            ManagerError::Vmm { .. } => 502,
            ManagerError::Timeout { .. } => 504,
            _ => 500,
        }
    }

    /// The domain the error is about, where known.
    pub fn domain(&self) -> Option<&str> {
        match self {
            ManagerError::NotFound { domain }
            | ManagerError::Exists { domain }
            | ManagerError::InvalidState { domain, .. }
            | ManagerError::Tune { domain, .. }
            | ManagerError::Vmm { domain, .. }
            | ManagerError::Spawn { domain, .. }
            | ManagerError::StartFailed { domain, .. }
            | ManagerError::Timeout { domain, .. }
            | ManagerError::Invalid { domain, .. }
            | ManagerError::Network { domain, .. }
            | ManagerError::Console { domain, .. }
            | ManagerError::NoCgroups { domain, .. } => Some(domain),
            ManagerError::Config(ConfigError::Invalid { domain, .. }) => Some(domain),
            ManagerError::Config(_) | ManagerError::Io { .. } => None,
        }
    }

    /// The definition field or request parameter at fault, where one is.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ManagerError::Config(e) => e.field(),
            ManagerError::Tune { source, .. } => source.field(),
            ManagerError::Invalid { field, .. } => Some(field),
            ManagerError::InvalidState { .. } => Some("state"),
            ManagerError::Exists { .. } => Some("name"),
            _ => None,
        }
    }
}
