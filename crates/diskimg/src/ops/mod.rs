//! The qemu-img verbs as library calls; `oxvirt img` only parses and prints.

pub mod commit;
pub mod compare;
pub mod convert;
pub mod info;
pub mod map;
pub mod measure;
pub mod resize;

use crate::block::{Allocation, BlockDevice};
use crate::error::Result;

/// What a range reads as through a whole backing chain: whether it is
/// known to be zero, the layer that decides (0 is the top), and for how
/// many bytes that holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainStatus {
    pub alloc: Allocation,
    pub depth: u32,
    pub len: u64,
}

impl ChainStatus {
    pub fn reads_zero(&self) -> bool {
        matches!(self.alloc, Allocation::Zero | Allocation::Unallocated)
    }
}

pub fn chain_status(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<ChainStatus> {
    let mut dev = dev;
    let mut len = len;
    let mut depth = 0;
    loop {
        let (alloc, n) = dev.block_status(offset, len)?;
        len = n.min(len);
        if alloc != Allocation::Unallocated {
            return Ok(ChainStatus { alloc, depth, len });
        }
        match dev.backing() {
            Some(b) if offset < b.size() => {
                len = len.min(b.size() - offset);
                dev = b;
                depth += 1;
            }
            Some(_) => {
                return Ok(ChainStatus {
                    alloc,
                    depth: depth + 1,
                    len,
                })
            }
            None => return Ok(ChainStatus { alloc, depth, len }),
        }
    }
}
