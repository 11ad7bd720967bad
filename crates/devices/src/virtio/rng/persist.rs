//! Saved state of a virtio-rng device.

use serde::{Deserialize, Serialize};

use super::{Rng, RngError};
use crate::rate_limiter::LimiterConfig;

/// Version of [`RngState`]; a restore refuses any other.
pub const RNG_STATE_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub version: u32,
    pub limit: LimiterConfig,
}

impl Rng {
    pub fn save(&self) -> RngState {
        RngState {
            version: RNG_STATE_VERSION,
            limit: self.limit(),
        }
    }

    pub fn restore(state: &RngState) -> Result<Self, RngError> {
        if state.version != RNG_STATE_VERSION {
            return Err(RngError::StateVersion {
                found: state.version,
                expected: RNG_STATE_VERSION,
            });
        }
        Rng::new(state.limit)
    }
}
