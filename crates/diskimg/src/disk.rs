//! A file with the path it came from, so every I/O error names it.
//!
//! A disk may be opened with O_DIRECT (the VMM's `cache=none`). The kernel
//! then wants offsets, lengths and buffer addresses aligned to the device's
//! block size; requests that are not go through an aligned bounce buffer,
//! partial blocks by read-modify-write. Every format driver does its I/O
//! through this type, so qcow2 metadata and data are aligned here too.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use crate::buf::AlignedBuf;
use crate::error::{corrupt, io, Error, Result};
use crate::iobuf::{self, IoBuf};

/// Alignment assumed where the filesystem does not report one (statx).
const DEFAULT_ALIGN: u64 = 4096;
/// Largest bounce buffer one unaligned request uses at a time.
const BOUNCE: u64 = 1 << 20;

pub struct Disk {
    pub file: File,
    pub path: PathBuf,
    direct: Option<Direct>,
}

/// What O_DIRECT asks of requests on this file.
struct Direct {
    mem_align: usize,
    offset_align: u64,
    /// Read-modify-write of a partial block takes it exclusively, aligned
    /// writes shared, so an aligned write is never undone by a concurrent
    /// read-modify-write of the same block.
    rmw: RwLock<()>,
}

impl Disk {
    /// Wraps a file opened for buffered I/O.
    pub fn new(file: File, path: &Path) -> Disk {
        Disk {
            file,
            path: path.to_path_buf(),
            direct: None,
        }
    }

    /// Opens an existing image file, with O_DIRECT if `direct`.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Disk> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if direct {
            opts.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
        }
        let file = match opts.open(path) {
            Ok(f) => f,
            Err(e)
                if direct && e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) =>
            {
                return Err(Error::Unsupported {
                    path: path.to_path_buf(),
                    what: "cache=none needs O_DIRECT, which this filesystem does not support"
                        .into(),
                })
            }
            Err(e) => return Err(io(path)(e)),
        };
        let mut disk = Disk::new(file, path);
        if direct {
            disk.direct = Some(Direct::for_file(&disk.file));
            let d = disk.direct.as_ref().map(|d| (d.mem_align, d.offset_align));
            tracing::debug!(path = %path.display(), align = ?d, "opened with O_DIRECT");
        }
        Ok(disk)
    }

    pub fn len(&self) -> Result<u64> {
        file_size(&self.file).map_err(io(&self.path))
    }

    /// Reads metadata; a short read means the metadata points past the end
    /// of the file, which is corruption, not an I/O error.
    pub fn read_meta(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        if self.read_upto(buf, offset)? < buf.len() {
            return Err(corrupt(
                &self.path,
                format!(
                    "{what} at offset 0x{offset:x} ({} bytes) lies beyond the end of the file",
                    buf.len()
                ),
            ));
        }
        Ok(())
    }

    /// Reads guest data; bytes past the end of the file read as zeroes
    /// (a sparse or preallocated image need not extend its file).
    pub fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let n = self.read_upto(buf, offset)?;
        buf[n..].fill(0);
        Ok(())
    }

    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        match &self.direct {
            Some(d) if !d.aligned(buf.as_ptr(), offset, buf.len()) => {
                self.write_bounced(d, buf, offset)
            }
            Some(d) => {
                let _shared = d.rmw.read().unwrap_or_else(|e| e.into_inner());
                self.file.write_all_at(buf, offset).map_err(io(&self.path))
            }
            None => self.file.write_all_at(buf, offset).map_err(io(&self.path)),
        }
    }

    /// `read_data` into the concatenation of `bufs`, straight into them;
    /// false (nothing read) where O_DIRECT cannot take them as they are,
    /// so the caller bounces.
    pub fn read_vectored(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<bool> {
        if !self.vectored_fits(bufs, offset) {
            return Ok(false);
        }
        let mut rest = bufs.to_vec();
        let mut at = offset;
        while iobuf::total_len(&rest) > 0 {
            let n = self.vectored_call(&rest, at, false)?;
            let ended = n == 0
                || self
                    .direct
                    .as_ref()
                    .is_some_and(|d| !(n as u64).is_multiple_of(d.offset_align));
            iobuf::advance(&mut rest, n);
            at += n as u64;
            if ended {
                iobuf::zero(&rest);
                break;
            }
        }
        Ok(true)
    }

    /// `write` of the concatenation of `bufs`, straight from them; false
    /// (nothing written) where O_DIRECT cannot take them as they are.
    pub fn write_vectored(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<bool> {
        if !self.vectored_fits(bufs, offset) {
            return Ok(false);
        }
        let _shared = self
            .direct
            .as_ref()
            .map(|d| d.rmw.read().unwrap_or_else(|e| e.into_inner()));
        let mut rest = bufs.to_vec();
        let mut at = offset;
        while iobuf::total_len(&rest) > 0 {
            let n = self.vectored_call(&rest, at, true)?;
            if n == 0 {
                return Err(io(&self.path)(std::io::ErrorKind::WriteZero.into()));
            }
            iobuf::advance(&mut rest, n);
            at += n as u64;
        }
        Ok(true)
    }

    /// Whether every buffer suits this file's O_DIRECT alignment, if any.
    pub fn vectored_fits(&self, bufs: &[IoBuf<'_>], offset: u64) -> bool {
        self.direct.as_ref().is_none_or(|d| {
            offset.is_multiple_of(d.offset_align)
                && bufs.iter().all(|b| d.aligned(b.as_ptr(), 0, b.len()))
        })
    }

    /// One `preadv` or `pwritev` of (at most IOV_MAX of) `bufs` at
    /// `offset`, retried on EINTR; returns the bytes moved.
    fn vectored_call(&self, bufs: &[IoBuf<'_>], offset: u64, write: bool) -> Result<usize> {
        use std::os::fd::AsRawFd;
        const IOV_MAX: usize = 1024;
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .take(IOV_MAX)
            .map(|b| libc::iovec {
                iov_base: b.as_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let fd = self.file.as_raw_fd();
        let at = offset as libc::off_t;
        loop {
            // SAFETY: every iovec is an IoBuf, which its maker promised is
            // mapped readable and writable for as long as it lives; the
            // kernel reads or fills exactly those ranges.
            let n = unsafe {
                if write {
                    libc::pwritev(fd, iov.as_ptr(), iov.len() as i32, at)
                } else {
                    libc::preadv(fd, iov.as_ptr(), iov.len() as i32, at)
                }
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io(&self.path)(e));
            }
        }
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(io(&self.path))
    }

    /// Fills `buf` from `offset` up to the end of the file; returns how
    /// many bytes it read.
    fn read_upto(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        match &self.direct {
            Some(d) if !d.aligned(buf.as_ptr(), offset, buf.len()) => {
                self.read_bounced(d, buf, offset)
            }
            _ => self.pread(buf, offset),
        }
    }

    /// pread until `buf` is full or the file ends. Under O_DIRECT a read
    /// that ends off a block boundary has reached the end of the file.
    fn pread(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    if self
                        .direct
                        .as_ref()
                        .is_some_and(|d| !(done as u64).is_multiple_of(d.offset_align))
                    {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(&self.path)(e)),
            }
        }
        Ok(done)
    }

    fn read_bounced(&self, d: &Direct, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0usize;
        while done < buf.len() {
            let g = offset + done as u64;
            let start = d.down(g);
            let piece = (buf.len() - done).min((start + BOUNCE - g) as usize);
            let mut bounce =
                AlignedBuf::new((d.up(g + piece as u64) - start) as usize, d.mem_align);
            let got = self.pread(&mut bounce[..], start)?;
            let skip = (g - start) as usize;
            let avail = got.saturating_sub(skip).min(piece);
            buf[done..done + avail].copy_from_slice(&bounce[skip..skip + avail]);
            done += avail;
            if avail < piece {
                break;
            }
        }
        Ok(done)
    }

    /// Writes through aligned blocks, reading back the partial blocks at
    /// either end first; the file does not grow past what a buffered write
    /// would have made it.
    fn write_bounced(&self, d: &Direct, buf: &[u8], offset: u64) -> Result<()> {
        let _exclusive = d.rmw.write().unwrap_or_else(|e| e.into_inner());
        let file_len = self.len()?;
        let mut done = 0usize;
        while done < buf.len() {
            let g = offset + done as u64;
            let start = d.down(g);
            let piece = (buf.len() - done).min((start + BOUNCE - g) as usize);
            let end = g + piece as u64;
            let mut bounce = AlignedBuf::new((d.up(end) - start) as usize, d.mem_align);
            let block = d.offset_align as usize;
            let b = &mut bounce[..];
            if g != start {
                self.pread(&mut b[..block], start)?;
            }
            if !end.is_multiple_of(d.offset_align) && (d.down(end) != start || g == start) {
                let at = b.len() - block;
                self.pread(&mut b[at..], d.down(end))?;
            }
            let skip = (g - start) as usize;
            b[skip..skip + piece].copy_from_slice(&buf[done..done + piece]);
            self.file.write_all_at(b, start).map_err(io(&self.path))?;
            done += piece;
        }
        let wanted = file_len.max(offset + buf.len() as u64);
        if self.len()? > wanted {
            self.file.set_len(wanted).map_err(io(&self.path))?;
        }
        Ok(())
    }
}

impl Direct {
    /// The file's O_DIRECT alignment from statx, or 4096 where unknown.
    fn for_file(file: &File) -> Direct {
        use rustix::fs::{statx, AtFlags, StatxFlags};
        let st = statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN).ok();
        let known = |v: u32| (v.is_power_of_two()).then_some(v as u64);
        let (mem, off) = match st {
            Some(s) if StatxFlags::from_bits_retain(s.stx_mask).contains(StatxFlags::DIOALIGN) => {
                (known(s.stx_dio_mem_align), known(s.stx_dio_offset_align))
            }
            _ => (None, None),
        };
        Direct {
            mem_align: mem.unwrap_or(DEFAULT_ALIGN) as usize,
            offset_align: off.unwrap_or(DEFAULT_ALIGN),
            rmw: RwLock::new(()),
        }
    }

    fn aligned(&self, ptr: *const u8, offset: u64, len: usize) -> bool {
        (ptr as usize).is_multiple_of(self.mem_align)
            && offset.is_multiple_of(self.offset_align)
            && (len as u64).is_multiple_of(self.offset_align)
    }

    fn down(&self, x: u64) -> u64 {
        x - x % self.offset_align
    }

    fn up(&self, x: u64) -> u64 {
        x.div_ceil(self.offset_align) * self.offset_align
    }
}

pub fn be64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}

/// A file's size; a host block device (whose metadata says 0) is measured
/// by seeking to its end (all I/O here is positional, so the offset moving
/// does not matter).
pub(crate) fn file_size(file: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut file = file;
        return file.seek(SeekFrom::End(0));
    }
    Ok(meta.len())
}
