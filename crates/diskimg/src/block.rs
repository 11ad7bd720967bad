use crate::buf::AlignedBuf;
use crate::iobuf::{self, IoBuf};
use crate::Result;

/// Largest bounce buffer the default vectored methods use at a time.
const BOUNCE: u64 = 1 << 20;

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

    /// `read_at` into the concatenation of `bufs`. Formats that can read
    /// straight into them (raw files, qcow2 data runs) do; the default
    /// reads through a bounce buffer and copies.
    fn read_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        read_bounced(self, bufs, offset)
    }

    /// `write_at` of the concatenation of `bufs`; straight from them where
    /// the format can, else through a bounce buffer.
    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        write_bounced(self, bufs, offset)
    }

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

/// `read_vectored_at` through `read_at` and a bounce buffer.
pub(crate) fn read_bounced<D: BlockDevice + ?Sized>(
    dev: &D,
    bufs: &[IoBuf<'_>],
    offset: u64,
) -> Result<()> {
    let total = iobuf::total_len(bufs);
    let mut bounce = AlignedBuf::page(total.min(BOUNCE) as usize);
    let mut done = 0u64;
    while done < total {
        let piece = &mut bounce[..(total - done).min(BOUNCE) as usize];
        dev.read_at(piece, offset + done)?;
        iobuf::scatter(bufs, done, piece);
        done += piece.len() as u64;
    }
    Ok(())
}

/// `write_vectored_at` through a bounce buffer and `write_at`.
pub(crate) fn write_bounced<D: BlockDevice + ?Sized>(
    dev: &D,
    bufs: &[IoBuf<'_>],
    offset: u64,
) -> Result<()> {
    let total = iobuf::total_len(bufs);
    let mut bounce = AlignedBuf::page(total.min(BOUNCE) as usize);
    let mut done = 0u64;
    while done < total {
        let piece = &mut bounce[..(total - done).min(BOUNCE) as usize];
        iobuf::gather(bufs, done, piece);
        dev.write_at(piece, offset + done)?;
        done += piece.len() as u64;
    }
    Ok(())
}
