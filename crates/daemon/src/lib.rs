//! oxvirtd, the manager: domain definitions (TOML, one file each), one
//! `oxvirt vmm` process per running domain, its cgroups, and a REST API on
//! a unix socket. See docs/manager.md.

pub mod api;
pub mod blkio;
pub mod client;
pub mod cloudinit;
pub mod config;
pub mod console;
pub mod devices;
pub mod disk_attach;
pub mod domain;
pub mod error;
pub mod manager;
pub mod migrate;
mod net_api;
pub mod netdef;
pub mod network;
pub mod paths;
pub mod pool;
mod pool_api;
pub mod pooldef;
pub mod remote;
pub mod run_spec;
pub mod save;
pub mod server;
pub mod settings;
pub mod snapshot;
mod supervise;
pub mod tune;
pub mod vmm_client;

pub use error::ManagerError;
pub use manager::{Manager, ManagerOptions};
pub use supervise::{vmm_args, Exit};
