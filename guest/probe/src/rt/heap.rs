//! The heap, for the one user that needs it: `virtio-drivers` allocates an
//! indirect descriptor list (48 bytes for a block request) per request and
//! frees it on completion, which lets a 16-descriptor ring hold 16 requests
//! instead of 5. Power-of-two size classes from 16 bytes to 4 KiB, each a
//! free list refilled a page at a time from the DMA allocator (physical =
//! virtual, so the lists are device-visible as they are); larger blocks
//! come straight from it and are never reused. Valid after `virtio::init`.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, Ordering};

use super::virtio;

const MIN_BLOCK: usize = 16;
const PAGE: usize = 4096;
/// Classes 16, 32, ..., 4096 bytes.
const CLASSES: usize = 9;

/// A free block holds the next free block of its class.
struct FreeBlock {
    next: *mut FreeBlock,
}

pub struct Heap {
    lock: AtomicBool,
    free: UnsafeCell<[*mut FreeBlock; CLASSES]>,
}

// SAFETY: `free` is only touched with `lock` held.
unsafe impl Sync for Heap {}

#[global_allocator]
static HEAP: Heap = Heap {
    lock: AtomicBool::new(false),
    free: UnsafeCell::new([null_mut(); CLASSES]),
};

/// The block size for `layout`: a power of two covering size and alignment.
fn block_size(layout: &Layout) -> usize {
    layout
        .size()
        .max(layout.align())
        .max(MIN_BLOCK)
        .next_power_of_two()
}

fn class(block: usize) -> usize {
    (block.trailing_zeros() - MIN_BLOCK.trailing_zeros()) as usize
}

impl Heap {
    fn with_lists<R>(&self, f: impl FnOnce(&mut [*mut FreeBlock; CLASSES]) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            super::io::pause();
        }
        // SAFETY: the lock is held, so this is the only reference.
        let result = f(unsafe { &mut *self.free.get() });
        self.lock.store(false, Ordering::Release);
        result
    }
}

// SAFETY: blocks are handed out once until freed; a block of a power-of-two
// size carved from a page-aligned page is aligned to its size, which covers
// the layout's alignment.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let block = block_size(&layout);
        if block > PAGE {
            return virtio::alloc(block).map_or(null_mut(), |buf| buf.as_mut_ptr());
        }
        self.with_lists(|lists| {
            let list = &mut lists[class(block)];
            if list.is_null() {
                let Ok(page) = virtio::alloc(PAGE) else {
                    return null_mut();
                };
                for chunk in page.chunks_exact_mut(block) {
                    let free = chunk.as_mut_ptr().cast::<FreeBlock>();
                    // SAFETY: `chunk` is a fresh, aligned block of at least 16 bytes.
                    unsafe { free.write(FreeBlock { next: *list }) };
                    *list = free;
                }
            }
            let head = *list;
            // SAFETY: `head` is a free block of this class (non-null here).
            *list = unsafe { (*head).next };
            head.cast()
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let block = block_size(&layout);
        if block > PAGE {
            return;
        }
        self.with_lists(|lists| {
            let list = &mut lists[class(block)];
            let free = ptr.cast::<FreeBlock>();
            // SAFETY: the caller returns a block this class handed out.
            unsafe { free.write(FreeBlock { next: *list }) };
            *list = free;
        });
    }
}
