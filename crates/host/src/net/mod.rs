//! Host networking for VMs: tap devices, Linux bridges, veth pairs, network
//! namespaces and NAT for the default network.
//!
//! Links and addresses go through iproute2's `ip` and NAT through `nft`
//! (both Debian packages, see scripts/apt-packages.txt); tap devices are
//! opened directly on `/dev/net/tun`, since the VMM needs their file.

mod addr;
mod command;
pub mod dhcp;
mod link;
mod nat;
mod netns;
mod tap;

use std::path::PathBuf;

pub use addr::Ipv4Cidr;
pub use link::{LinkInfo, Links};
pub use nat::{set_ipv4_forwarding, Nat, NatConfig, NatNetwork};
pub use netns::NetNs;
pub use tap::{Tap, TapConfig, VNET_HDR_LEN};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("running {program}: {source} (is it installed? scripts/setup.sh installs it)")]
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("invalid {kind} name {name:?}: {reason}")]
    BadName {
        kind: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("invalid address {input:?}: {reason}")]
    BadAddress { input: String, reason: &'static str },
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tap {name}: {op} failed: {source}")]
    Tap {
        name: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("entering network namespace {name}: {source}")]
    EnterNetns { name: String, source: nix::Error },
    #[error("network namespace {name} does not exist")]
    NoNetns { name: String },
    #[error("parsing the output of `{command}`: {reason}")]
    Parse { command: String, reason: String },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}
