//! virtio-rng: entropy from the host's getrandom(2).

mod device;
mod persist;

pub use device::{Rng, RngStats};
pub use persist::{RngState, RNG_STATE_VERSION};

use crate::rate_limiter;

/// Errors creating or restoring a virtio-rng device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("virtio-rng: rate limit: {0}")]
    RateLimit(#[from] rate_limiter::Error),
    #[error("virtio-rng state version {found} is not supported (expected {expected})")]
    StateVersion { found: u32, expected: u32 },
}
