//! Which pages of guest RAM were never touched, from `/proc/self/pagemap`.
//!
//! Guest RAM is private anonymous memory: a page that is neither present
//! nor swapped out (nor a migration entry, which the kernel reports as
//! swapped) has never been written and reads as zeros. The first pass
//! sends such pages as zero without reading them, and the destination
//! skips zero pages that land on them; reading them would fault in a zero
//! page per page (or huge page) for nothing.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestAddress, GuestMemoryBackend};

use devices::GuestMemory;

use super::PAGE_SIZE;

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;

/// Pages asked about per `pread`.
pub const CHUNK_PAGES: usize = 512;

/// The process's page map; without one (no /proc) every page counts as touched.
pub struct Pagemap {
    file: Option<File>,
    entries: Vec<u8>,
}

impl Pagemap {
    pub fn open() -> Self {
        let file = File::open("/proc/self/pagemap")
            .inspect_err(|e| tracing::debug!("/proc/self/pagemap: {e}; zero pages are read"))
            .ok();
        Pagemap {
            file,
            entries: vec![0; CHUNK_PAGES * 8],
        }
    }

    /// Fills `out` with one flag per page from guest address `addr`
    /// (at most [`CHUNK_PAGES`], all in one region): true where the page
    /// was never touched. All false where that cannot be told.
    pub fn untouched(
        &mut self,
        memory: &GuestMemory,
        addr: u64,
        pages: usize,
        out: &mut Vec<bool>,
    ) {
        out.clear();
        out.resize(pages, false);
        let Some(file) = &self.file else { return };
        let len = pages.min(CHUNK_PAGES) * 8;
        // The whole range must lie in one mapping for one pread to describe it.
        let Ok(host) = memory
            .get_slice(GuestAddress(addr), pages * PAGE_SIZE)
            .map(|s| s.ptr_guard().as_ptr() as u64)
        else {
            return;
        };
        let offset = host / PAGE_SIZE as u64 * 8;
        if file
            .read_exact_at(&mut self.entries[..len], offset)
            .is_err()
        {
            return;
        }
        for (flag, entry) in out.iter_mut().zip(self.entries[..len].chunks_exact(8)) {
            let entry = u64::from_le_bytes(entry.try_into().unwrap_or([0xff; 8]));
            *flag = entry & (PRESENT | SWAPPED) == 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn written_pages_are_touched_and_the_rest_untouched() {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), 64 * PAGE_SIZE)]).unwrap();
        memory
            .write_slice(&[1], GuestAddress(5 * PAGE_SIZE as u64))
            .unwrap();
        let mut map = Pagemap::open();
        let mut flags = Vec::new();
        map.untouched(&memory, 0, 64, &mut flags);
        assert_eq!(flags.len(), 64);
        assert!(!flags[5], "a written page is touched");
        // 256 KiB cannot hold a huge page: the neighbours stay untouched.
        if map.file.is_some() {
            assert!(flags[0] && flags[4] && flags[6] && flags[63], "{flags:?}");
        }
        // A range outside memory is never called untouched.
        map.untouched(&memory, 63 * PAGE_SIZE as u64, 2, &mut flags);
        assert_eq!(flags, [false, false]);
    }
}
