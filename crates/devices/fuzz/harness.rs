//! The virtio-blk request parser under hostile guest memory: shared by the
//! fuzz target and the corpus replay test.
//!
//! The input is the first bytes of a 64 KiB guest memory holding a queue of
//! 16 entries: descriptor table at 0x000, available ring at 0x100, used ring
//! at 0x200. Up to four chains are popped and parsed for a 128-sector disk;
//! whatever the parser accepts must be safe to execute.

use devices::virtio::block::request::{parse, RequestType, SECTOR_SIZE};
use devices::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM_SIZE: usize = 0x1_0000;
const QUEUE_SIZE: u16 = 16;
const AVAIL: u64 = 0x100;
const CAPACITY: u64 = 128;

/// Returns how many well-formed requests the input held.
pub fn run(data: &[u8]) -> usize {
    let mem: GuestMemory =
        GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
            .expect("guest memory");
    let len = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..len], GuestAddress(0))
        .expect("fill memory");
    // At most four chains, so that a run stays short.
    let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).expect("avail idx");
    mem.write_obj(idx % 5, GuestAddress(AVAIL + 2))
        .expect("avail idx");

    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(0x200), Some(0));
    queue.set_ready(true);
    let mut accepted = 0;
    while let Some(chain) = queue.pop_descriptor_chain(&mem) {
        let parsed = parse(chain, CAPACITY);
        if let Some(status) = parsed.status {
            assert!(mem.check_range(status, 1), "status byte outside memory");
        }
        let Ok(request) = parsed.request else {
            continue;
        };
        accepted += 1;
        for seg in &request.data {
            assert!(
                mem.check_range(seg.addr, seg.len as usize),
                "segment outside memory"
            );
        }
        if matches!(request.kind, RequestType::In | RequestType::Out) {
            let end = request.sector as u128 * SECTOR_SIZE as u128 + request.data_len() as u128;
            assert!(
                end <= (CAPACITY * SECTOR_SIZE) as u128,
                "request beyond the disk"
            );
        }
    }
    accepted
}
