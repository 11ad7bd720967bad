//! Saved state of a virtio-net device. The tap itself is reopened by the
//! VMM from its configuration; frames in flight are not saved (a network
//! may lose them anyway).

use serde::{Deserialize, Serialize};

use super::{Net, NetConfig, NetError, Tap};

/// Version of [`NetState`]; a restore refuses any other.
pub const NET_STATE_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub version: u32,
    pub config: NetConfig,
    pub link_up: bool,
}

impl Net {
    /// The device's state; throttles are saved as currently in force.
    pub fn save(&self) -> NetState {
        let (rx_limit, tx_limit) = self.handle().throttle();
        NetState {
            version: NET_STATE_VERSION,
            config: NetConfig {
                rx_limit,
                tx_limit,
                ..self.config().clone()
            },
            link_up: self.link_up(),
        }
    }

    pub fn restore(tap: Tap, state: &NetState) -> Result<Self, NetError> {
        if state.version != NET_STATE_VERSION {
            return Err(NetError::StateVersion {
                found: state.version,
                expected: NET_STATE_VERSION,
            });
        }
        let mut net = Net::new(tap, state.config.clone())?;
        net.set_link_up(state.link_up);
        Ok(net)
    }
}
