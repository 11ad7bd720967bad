//! `oxvirt lb`: an nginx-stream compatible L4 load balancer on tokio.

pub mod balancer;
pub mod config;
pub mod proxy_protocol;
pub mod vars;
