//! Raw images: the file is the disk.

use std::fs::OpenOptions;
use std::path::Path;

use crate::block::{self, Allocation, BlockDevice};
use crate::disk::Disk;
use crate::error::{io, Error, Result};
use crate::iobuf::{self, IoBuf};

pub struct Raw {
    disk: Disk,
    size: u64,
    read_only: bool,
}

impl Raw {
    /// Opens a raw image, with O_DIRECT if `direct`.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Raw> {
        let disk = Disk::open(path, read_only, direct)?;
        // As QEMU: a raw disk is whole 512-byte sectors; the tail reads as zeroes.
        let size = disk.len()?.div_ceil(512) * 512;
        Ok(Raw {
            disk,
            size,
            read_only,
        })
    }

    /// Creates a sparse raw image of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io(path))?;
        file.set_len(size.div_ceil(512) * 512).map_err(io(path))
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> Result<()> {
        if write && self.read_only {
            return Err(Error::ReadOnly {
                path: self.disk.path.clone(),
            });
        }
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(Error::OutOfRange {
                path: self.disk.path.clone(),
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }
}

impl BlockDevice for Raw {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64, false)?;
        self.disk.read_data(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(offset, buf.len() as u64, true)?;
        self.disk.write(buf, offset)
    }

    fn read_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        self.check(offset, iobuf::total_len(bufs), false)?;
        if self.disk.read_vectored(bufs, offset)? {
            return Ok(());
        }
        block::read_bounced(self, bufs, offset)
    }

    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        self.check(offset, iobuf::total_len(bufs), true)?;
        if self.disk.write_vectored(bufs, offset)? {
            return Ok(());
        }
        block::write_bounced(self, bufs, offset)
    }

    fn flush(&self) -> Result<()> {
        self.disk.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, true)?;
        let flags = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        if rustix::fs::fallocate(&self.disk.file, flags, offset, len).is_ok() {
            return Ok(());
        }
        let zeroes = vec![0u8; (len.min(1 << 20)) as usize];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeroes.len() as u64) as usize;
            self.disk.write(&zeroes[..n], offset + at)?;
            at += n as u64;
        }
        Ok(())
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    /// Holes in the file (SEEK_HOLE) read as zeroes.
    fn block_status(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        use rustix::fs::{seek, SeekFrom};
        let end = offset + len;
        let f = &self.disk.file;
        match seek(f, SeekFrom::Data(offset)) {
            Ok(data) if data > offset => Ok((Allocation::Zero, (data.min(end)) - offset)),
            Ok(_) => {
                let hole =
                    seek(f, SeekFrom::Hole(offset)).map_err(|e| io(&self.disk.path)(e.into()))?;
                let n = hole.min(end).saturating_sub(offset).max(1);
                Ok((
                    Allocation::Data {
                        host: Some(offset),
                        compressed: false,
                    },
                    n,
                ))
            }
            // ENXIO: no data after offset, the rest is a hole.
            Err(_) => Ok((Allocation::Zero, len)),
        }
    }
}
