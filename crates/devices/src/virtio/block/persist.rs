//! Saved state of a virtio-blk device. Queue state is the transport's; this
//! is what the device itself must agree on after a restore.

use std::sync::Arc;

use diskimg::BlockDevice;
use serde::{Deserialize, Serialize};

use super::{Block, BlockConfig, BlockError};

/// Version of [`BlockState`]; a restore refuses any other.
pub const BLOCK_STATE_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    pub version: u32,
    pub config: BlockConfig,
    /// Sectors the guest saw; the restored disk must have as many.
    pub capacity: u64,
}

impl Block {
    /// The device's state; throttles are saved as currently in force.
    pub fn save(&self) -> BlockState {
        let (read_limit, write_limit) = self.handle().throttle();
        BlockState {
            version: BLOCK_STATE_VERSION,
            config: BlockConfig {
                read_limit,
                write_limit,
                ..self.config().clone()
            },
            capacity: self.capacity(),
        }
    }

    /// Rebuilds the device over `disk`, which must be the same size.
    pub fn restore(disk: Arc<dyn BlockDevice>, state: &BlockState) -> Result<Self, BlockError> {
        if state.version != BLOCK_STATE_VERSION {
            return Err(BlockError::StateVersion {
                found: state.version,
                expected: BLOCK_STATE_VERSION,
            });
        }
        let block = Block::new(disk, state.config.clone())?;
        if block.capacity() != state.capacity {
            return Err(BlockError::CapacityChanged {
                saved: state.capacity,
                now: block.capacity(),
            });
        }
        Ok(block)
    }
}
