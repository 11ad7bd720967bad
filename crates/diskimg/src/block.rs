use crate::Result;

/// A virtual disk: byte-addressed, fixed size, shareable between threads.
///
/// Implementations take `&self` so that one device can serve several
/// virtio-blk queues or converter threads at once; they serialise internally
/// where the format needs it (metadata updates), not around data I/O.
pub trait BlockDevice: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from guest offset `offset`. Unallocated areas read as the
    /// backing file's data, or zeroes where there is none.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at `offset`, allocating as the format needs.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes every completed write durable (data and metadata).
    fn flush(&self) -> Result<()>;

    /// Tells the format that `len` bytes at `offset` are no longer needed;
    /// they read back as zeroes or as the backing file, as the format defines.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes `len` bytes at `offset` read as zeroes, without writing data
    /// where the format can record zeroes in its metadata.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;

    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }

    /// What the range starting at `offset` holds in this layer, and for how
    /// many bytes (at most `len`, at least 1) that answer holds.
    fn block_status(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        Ok((
            Allocation::Data {
                host: Some(offset),
                compressed: false,
            },
            len.min(self.size().saturating_sub(offset)).max(1),
        ))
    }

    /// The image this one reads unallocated ranges from, if any.
    fn backing(&self) -> Option<&dyn BlockDevice> {
        None
    }
}

/// How one layer of an image stores a range of guest bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// Data stored in this layer, at `host` in its file where known.
    Data { host: Option<u64>, compressed: bool },
    /// Reads as zeroes, recorded in metadata (no data stored).
    Zero,
    /// Not allocated here: reads from the backing image, or as zeroes.
    Unallocated,
}
