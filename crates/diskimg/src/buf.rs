//! Aligned I/O buffers.
//!
//! Where a buffer starts matters to the kernel's copies between the page
//! cache and user memory: on this project's machines (AMD EPYC) a 2 MiB
//! `pread` into a buffer that starts 16 bytes past a page boundary (what
//! malloc returns for large blocks) costs five times the CPU of one into
//! an aligned buffer, and O_DIRECT needs alignment anyway. Every bulk
//! buffer in this crate is one of these.

use std::ops::{Deref, DerefMut};

/// Alignment of bulk buffers: a page.
pub const PAGE: usize = 4096;

/// A zeroed buffer whose start is aligned, carved out of a larger Vec.
pub struct AlignedBuf {
    buf: Vec<u8>,
    at: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes starting at a multiple of `align` (a power of two).
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let buf = vec![0u8; len + align];
        let at = buf.as_ptr().align_offset(align);
        AlignedBuf { buf, at, len }
    }

    /// `len` zero bytes starting on a page boundary.
    pub fn page(len: usize) -> AlignedBuf {
        AlignedBuf::new(len, PAGE)
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.at..self.at + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.at..self.at + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_aligned_and_is_zeroed() {
        for len in [0, 1, 4096, 65536 + 3, 2 << 20] {
            let mut b = AlignedBuf::page(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % PAGE, 0);
            assert!(b.iter().all(|&x| x == 0));
            b.fill(7);
            assert!(b.iter().all(|&x| x == 7));
        }
        assert_eq!(AlignedBuf::new(100, 512).as_ptr() as usize % 512, 0);
    }
}
