//! Disk image formats behind one [`BlockDevice`] trait.
//!
//! `oxvirt img` (the qemu-img compatible tool) and the VMM's virtio-blk both
//! go through this crate; nothing here knows about either of them.

mod block;
mod buf;
mod compress;
mod disk;
mod error;
pub mod fuzzing;
pub mod image;
mod iobuf;
pub mod iso9660;
mod offset_map;
pub mod ops;
pub mod qcow2;
pub mod raw;
pub mod vmdk;

pub use block::{Allocation, BlockDevice};
pub use error::{Error, Result};
pub use image::{open, open_with, Format, OpenOptions};
pub use iobuf::{total_len, IoBuf};
