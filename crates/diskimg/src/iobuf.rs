//! Caller-provided memory for vectored I/O: a VMM's guest memory, which
//! the guest may change while a request runs, so Rust code never borrows
//! it. It is handed to the kernel (`preadv`/`pwritev`) or copied with raw
//! pointer copies, never turned into a `&[u8]`.

use std::marker::PhantomData;

/// `len` bytes at `ptr`, valid for `'a`.
#[derive(Clone, Copy, Debug)]
pub struct IoBuf<'a> {
    ptr: *mut u8,
    len: usize,
    _mem: PhantomData<&'a ()>,
}

// SAFETY: an IoBuf is an address range whose validity `IoBuf::new`'s caller
// guarantees for 'a on every thread; it owns nothing thread-bound.
unsafe impl Send for IoBuf<'_> {}
// SAFETY: as for Send; shared IoBufs only allow raw copies and syscalls.
unsafe impl Sync for IoBuf<'_> {}

impl<'a> IoBuf<'a> {
    /// # Safety
    ///
    /// `ptr..ptr + len` must stay mapped, readable and writable, for `'a`.
    /// Others (another thread, a guest) may read and write it meanwhile:
    /// what they see of a concurrent copy is unspecified bytes, nothing
    /// worse, because this crate never creates references to it.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> IoBuf<'a> {
        IoBuf {
            ptr,
            len,
            _mem: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The bytes from `at` on (`at` at most `len`).
    fn tail(&self, at: usize) -> IoBuf<'a> {
        let at = at.min(self.len);
        IoBuf {
            // SAFETY: `at <= len`, so the result stays inside the range.
            ptr: unsafe { self.ptr.add(at) },
            len: self.len - at,
            _mem: PhantomData,
        }
    }

    /// Copies `src` to the start of this buffer (`src.len() <= len`).
    fn fill_from(&self, src: &[u8]) {
        let n = src.len().min(self.len);
        // SAFETY: `new`'s contract makes `ptr..ptr + len` writable; `src`
        // is ordinary Rust memory, so the two cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, n) }
    }

    /// Copies the start of this buffer into `dst` (`dst.len() <= len`).
    fn copy_into(&self, dst: &mut [u8]) {
        let n = dst.len().min(self.len);
        // SAFETY: as in `fill_from`, with the roles swapped.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, dst.as_mut_ptr(), n) }
    }
}

/// Total length of a list of buffers.
pub fn total_len(bufs: &[IoBuf<'_>]) -> u64 {
    bufs.iter().map(|b| b.len as u64).sum()
}

/// The buffers covering bytes `from..to` of the concatenation of `bufs`.
pub(crate) fn sub_range<'a>(bufs: &[IoBuf<'a>], from: u64, to: u64) -> Vec<IoBuf<'a>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    for b in bufs {
        let end = start + b.len as u64;
        if b.len > 0 && end > from && start < to {
            let skip = from.saturating_sub(start) as usize;
            let keep = (to.min(end) - start) as usize - skip;
            let mut piece = b.tail(skip);
            piece.len = keep;
            out.push(piece);
        }
        if end >= to {
            break;
        }
        start = end;
    }
    out
}

/// Copies `src` into the concatenation of `bufs` from byte `at` on.
pub(crate) fn scatter(bufs: &[IoBuf<'_>], at: u64, src: &[u8]) {
    let mut done = 0;
    for b in sub_range(bufs, at, at + src.len() as u64) {
        b.fill_from(&src[done..done + b.len]);
        done += b.len;
    }
}

/// Zeroes every buffer.
pub(crate) fn zero(bufs: &[IoBuf<'_>]) {
    for b in bufs {
        // SAFETY: `new`'s contract makes `ptr..ptr + len` writable.
        unsafe { std::ptr::write_bytes(b.ptr, 0, b.len) }
    }
}

/// Copies bytes `at..at + dst.len()` of the concatenation of `bufs` into `dst`.
pub(crate) fn gather(bufs: &[IoBuf<'_>], at: u64, dst: &mut [u8]) {
    let mut done = 0;
    for b in sub_range(bufs, at, at + dst.len() as u64) {
        b.copy_into(&mut dst[done..done + b.len]);
        done += b.len;
    }
}

/// Drops the first `n` bytes of `bufs` (what a partial `preadv` consumed).
pub(crate) fn advance(bufs: &mut Vec<IoBuf<'_>>, mut n: usize) {
    let whole = bufs.iter().take_while(|b| {
        let all = b.len <= n;
        if all {
            n -= b.len;
        }
        all
    });
    let count = whole.count();
    bufs.drain(..count);
    if let Some(first) = bufs.first_mut() {
        *first = first.tail(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bufs<'a>(mem: &'a mut [u8], lens: &[usize]) -> Vec<IoBuf<'a>> {
        let mut at = 0;
        lens.iter()
            .map(|&l| {
                // SAFETY: each piece lies inside `mem`, borrowed for 'a.
                let b = unsafe { IoBuf::new(mem.as_mut_ptr().add(at), l) };
                at += l;
                b
            })
            .collect()
    }

    #[test]
    fn sub_range_scatter_gather_and_advance_agree_with_the_concatenation() {
        let mut mem = [0u8; 10];
        let b = bufs(&mut mem, &[3, 0, 4, 3]);
        scatter(&b, 2, &[1, 2, 3, 4, 5, 6]);
        let mut out = [0u8; 8];
        gather(&b, 1, &mut out);
        assert_eq!(out, [0, 1, 2, 3, 4, 5, 6, 0]);
        let lens: Vec<usize> = sub_range(&b, 2, 8).iter().map(IoBuf::len).collect();
        assert_eq!(lens, vec![1, 4, 1]);
        let mut rest = b.clone();
        advance(&mut rest, 5);
        assert_eq!(total_len(&rest), 5);
        assert_eq!(rest[0].len(), 2);
        let mut first = [0u8; 1];
        rest[0].copy_into(&mut first);
        assert_eq!(first, [4]);
        advance(&mut rest, 5);
        assert!(rest.is_empty());
    }
}
