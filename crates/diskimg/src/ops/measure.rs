//! `qemu-img measure`: the file size a conversion (or a new image) needs,
//! computed as QEMU's qcow2_measure does.

use super::chain_status;
use crate::block::{Allocation, BlockDevice};
use crate::error::Result;
use crate::image::Format;
use crate::qcow2::create::CreateOptions;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measure {
    pub required: u64,
    pub fully_allocated: u64,
}

/// Refcount table and block bytes needed to count `clusters` clusters
/// (plus themselves).
fn refcount_metadata(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = cs * 8 / (1 << refcount_order);
    let (mut table, mut blocks, mut n) = (0, 0, 0);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

/// Size of a fully preallocated qcow2 image of `size` bytes.
fn prealloc_size(size: u64, opts: &CreateOptions) -> u64 {
    let cs = opts.cluster_size;
    let aligned = size.div_ceil(cs) * cs;
    let l2e = if opts.extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let nl2e = (aligned / cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).div_ceil(cs / 8) * (cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata(
        (meta + aligned) / cs,
        cs,
        opts.refcount_bits.trailing_zeros(),
    );
    meta + aligned
}

/// Measures for a target format, from a source image or a bare size.
pub fn measure(
    source: Option<&dyn BlockDevice>,
    size: u64,
    format: Format,
    opts: &CreateOptions,
) -> Result<Measure> {
    let size = source.map_or(size, |s| s.size()).div_ceil(512) * 512;
    let cs = opts.cluster_size;
    let preallocated = opts.preallocation != crate::qcow2::create::Preallocation::Off;
    let mut required = if preallocated { size } else { 0 };
    if let (Some(src), false) = (source, preallocated) {
        required = 0;
        let mut at = 0;
        while at < size.min(src.size()) {
            let st = chain_status(src, at, src.size() - at)?;
            let mut n = st.len;
            if matches!(st.alloc, Allocation::Data { .. }) {
                n = (at + n).div_ceil(cs) * cs - at;
                required += at % cs + n;
            }
            at += n;
        }
    }
    if format == Format::Raw {
        return Ok(Measure {
            required: size,
            fully_allocated: size,
        });
    }
    let fully_allocated = prealloc_size(size, opts);
    Ok(Measure {
        required: fully_allocated - size + required,
        fully_allocated,
    })
}
