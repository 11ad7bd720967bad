//! Disk image formats behind one [`BlockDevice`] trait.
//!
//! `oxvirt img` (the qemu-img compatible tool) and the VMM's virtio-blk both
//! go through this crate; nothing here knows about either of them.

mod block;
mod error;

pub use block::BlockDevice;
pub use error::{Error, Result};
