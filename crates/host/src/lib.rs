//! Host resources the manager gives each VM: a cgroup per domain (v1, v2 or a
//! hybrid of both, detected at run time) and host networking (tap devices,
//! bridges, veth pairs, network namespaces, NAT with nftables).
//!
//! Docker's size and CPU flag syntax is parsed in [`size`], the one place that
//! knows it.

pub mod cgroup;
pub mod net;
pub mod size;
