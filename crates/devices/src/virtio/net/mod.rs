//! virtio-net over a tap device.

mod device;
mod persist;

use std::fmt;
use std::str::FromStr;

pub use device::{Net, NetHandle, NetStats};
/// The tap type is host's, shared with the manager's network code.
pub use host::net::{Tap, TapConfig, VNET_HDR_LEN};
pub use persist::{NetState, NET_STATE_VERSION};
use serde::{Deserialize, Serialize};

use crate::rate_limiter::{self, LimiterConfig};

/// Errors creating or restoring a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] host::net::NetError),
    #[error("MAC address {0:?}: expected six hex bytes separated by ':'")]
    Mac(String),
    #[error("virtio-net: queue size {0} is not a power of two between 2 and 32768")]
    QueueSize(u16),
    #[error("virtio-net: throttle: {0}")]
    Throttle(#[from] rate_limiter::Error),
    #[error("virtio-net: creating an EventFd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("virtio-net state version {found} is not supported (expected {expected})")]
    StateVersion { found: u32, expected: u32 },
}

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::Mac(s.to_owned());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(mac))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// How the NIC is presented to the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub mac: MacAddr,
    /// Guest to host (bytes and packets).
    pub tx_limit: LimiterConfig,
    /// Host to guest.
    pub rx_limit: LimiterConfig,
    pub queue_size: u16,
}

impl NetConfig {
    pub fn new(mac: MacAddr) -> Self {
        NetConfig {
            mac,
            tx_limit: LimiterConfig::default(),
            rx_limit: LimiterConfig::default(),
            queue_size: 256,
        }
    }
}
