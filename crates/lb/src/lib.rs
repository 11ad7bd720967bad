//! `oxvirt lb`: an nginx-stream compatible L4 load balancer on tokio.
//!
//! [`config`] reads nginx `stream { }` files, [`balancer`] picks upstream
//! peers, [`tcp`] and [`udp`] run sessions, [`runtime`] owns listeners,
//! reloads and signals, [`uring`] runs TCP sessions on io_uring, [`api`] serves the HTTP+JSON runtime API.

pub mod access_log;
pub mod api;
pub mod balancer;
pub mod config;
pub mod health;
pub mod limits;
pub mod proxy_protocol;
pub mod relay;
pub mod runtime;
pub mod tcp;
pub mod udp;
pub mod uring;
pub mod vars;

pub use config::Config;
pub use runtime::{run_file, Balancer, RunError};
