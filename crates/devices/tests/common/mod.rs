//! A small virtio driver for tests: it lays split virtqueues out in a
//! `GuestMemory` built by the test and drives a device through its
//! virtio-mmio registers, as a guest kernel would.
#![allow(dead_code)] // each test binary uses a different part

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::{MmioTransport, VirtioDevice};
use devices::{BusDevice, GuestMemory, Interrupt};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress};

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

const STATUS_ACK: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;

/// Guest memory: 16 MiB from address 0, with a dirty bitmap.
pub fn guest_memory() -> GuestMemory {
    vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 16 << 20)])
        .expect("guest memory")
}

/// Where test data buffers live (queues sit below).
pub const DATA_BASE: u64 = 0x40_0000;

/// An interrupt line that counts how often it fired.
#[derive(Default)]
pub struct CountingIrq(pub AtomicUsize);

impl Interrupt for CountingIrq {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl CountingIrq {
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// Driver-side view of one split virtqueue.
pub struct DriverQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub fn rd(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

pub fn wr(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

impl DriverQueue {
    /// Queue `index` of `size` entries at a fixed spot below [`DATA_BASE`].
    pub fn new(index: u64, size: u16) -> Self {
        let base = 0x10_0000 + index * 0x4_0000;
        DriverQueue {
            size,
            desc: base,
            avail: base + 16 * u64::from(size),
            used: base + 0x2_0000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Writes a raw descriptor at `index`.
    pub fn write_desc(
        &self,
        mem: &GuestMemory,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        mem.write_obj(addr.to_le(), at).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(at.0 + 12))
            .unwrap();
        mem.write_obj(next.to_le(), GuestAddress(at.0 + 14))
            .unwrap();
    }

    /// Makes the chain starting at descriptor `head` available.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(self.avail_idx % self.size));
        mem.write_obj(head.to_le(), slot).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::SeqCst);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Writes `bufs` as a chain into free descriptors and publishes it.
    pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, b) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = if b.write { VIRTQ_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(mem, index, b.addr, b.len, flags, (index + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.publish(mem, head);
        head
    }

    /// The next used element (id, len), if the device produced one.
    pub fn take_used(&mut self, mem: &GuestMemory) -> Option<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        let elem = GuestAddress(self.used + 4 + 8 * u64::from(self.used_seen % self.size));
        let id: u32 = mem.read_obj(elem).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(elem.0 + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }

    /// Waits up to `timeout` for the next used element.
    pub fn wait_used(&mut self, mem: &GuestMemory, timeout: Duration) -> Option<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(u) = self.take_used(mem) {
                return Some(u);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Where [`DriverQueue::add_chain`] writes its next descriptors.
    pub fn set_next_desc(&mut self, index: u16) {
        self.next_desc = index;
    }
}

/// A device behind its transport, with a driver's view of its queues.
pub struct Driver<D: VirtioDevice> {
    pub transport: MmioTransport<D>,
    pub mem: GuestMemory,
    pub irq: Arc<CountingIrq>,
    pub queues: Vec<DriverQueue>,
}

impl<D: VirtioDevice> Driver<D> {
    pub fn new(device: D) -> Self {
        Self::with_memory(device, guest_memory())
    }

    pub fn with_memory(device: D, mem: GuestMemory) -> Self {
        let irq = Arc::new(CountingIrq::default());
        let transport = MmioTransport::new(device, mem.clone(), irq.clone()).unwrap();
        Driver {
            transport,
            mem,
            irq,
            queues: Vec::new(),
        }
    }

    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write_reg(&mut self, offset: u64, v: u32) {
        self.transport.write(offset, &v.to_le_bytes());
    }

    pub fn device_features(&mut self) -> u64 {
        self.write_reg(0x14, 0);
        let lo = self.read_reg(0x10);
        self.write_reg(0x14, 1);
        let hi = self.read_reg(0x10);
        u64::from(hi) << 32 | u64::from(lo)
    }

    /// Negotiates `features` (masked by what the device offers); returns
    /// whether the device accepted them (FEATURES_OK stuck).
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.write_reg(0x70, 0);
        self.write_reg(0x70, STATUS_ACK);
        self.write_reg(0x70, STATUS_ACK | STATUS_DRIVER);
        self.write_reg(0x24, 0);
        self.write_reg(0x20, features as u32);
        self.write_reg(0x24, 1);
        self.write_reg(0x20, (features >> 32) as u32);
        self.write_reg(0x70, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        self.read_reg(0x70) & STATUS_FEATURES_OK != 0
    }

    /// Full initialisation: features, `num` queues of `size`, DRIVER_OK.
    pub fn init(&mut self, features: u64, num: usize, size: u16) {
        let offered = self.device_features();
        assert!(
            self.negotiate(features & offered),
            "device refused features"
        );
        self.queues.clear();
        for i in 0..num {
            let q = DriverQueue::new(i as u64, size);
            self.write_reg(0x30, i as u32);
            assert!(
                self.read_reg(0x34) >= u32::from(size),
                "queue {i} too small"
            );
            self.write_reg(0x38, u32::from(size));
            for (reg, addr) in [(0x80, q.desc), (0x90, q.avail), (0xa0, q.used)] {
                self.write_reg(reg, addr as u32);
                self.write_reg(reg + 4, (addr >> 32) as u32);
            }
            self.write_reg(0x44, 1);
            // Fresh rings: zeroed avail and used.
            self.mem
                .write_slice(&[0u8; 4], GuestAddress(q.avail))
                .unwrap();
            self.mem
                .write_slice(&[0u8; 4], GuestAddress(q.used))
                .unwrap();
            self.queues.push(q);
        }
        self.write_reg(
            0x70,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(self.transport.is_active(), "device did not activate");
    }

    pub fn notify(&mut self, queue: u32) {
        self.write_reg(0x50, queue);
    }

    /// Adds a chain on `queue`, notifies, and waits for its completion.
    pub fn submit(&mut self, queue: usize, bufs: &[Buf]) -> (u32, u32) {
        let head = self.queues[queue].add_chain(&self.mem, bufs);
        self.notify(queue as u32);
        let used = self.queues[queue]
            .wait_used(&self.mem, Duration::from_secs(10))
            .expect("device did not complete the request");
        assert_eq!(used.0, u32::from(head), "completion for another chain");
        used
    }
}

/// A test-only disk: a plain file, or the real opener where a test needs it.
pub struct FileDisk {
    pub file: File,
    pub read_only: bool,
    pub flushes: AtomicUsize,
}

impl FileDisk {
    pub fn create(path: &Path, size: u64) -> Self {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        file.set_len(size).unwrap();
        FileDisk {
            file,
            read_only: false,
            flushes: AtomicUsize::new(0),
        }
    }
}

fn io_err(e: std::io::Error) -> diskimg::Error {
    diskimg::Error::Io {
        path: "test-disk".into(),
        source: e,
    }
}

impl diskimg::BlockDevice for FileDisk {
    fn size(&self) -> u64 {
        self.file.metadata().unwrap().len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> diskimg::Result<()> {
        self.file.read_exact_at(buf, offset).map_err(io_err)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> diskimg::Result<()> {
        self.file.write_all_at(buf, offset).map_err(io_err)
    }
    fn flush(&self) -> diskimg::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.file.sync_data().map_err(io_err)
    }
    fn discard(&self, offset: u64, len: u64) -> diskimg::Result<()> {
        self.write_zeroes(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> diskimg::Result<()> {
        self.file
            .write_all_at(&vec![0u8; len as usize], offset)
            .map_err(io_err)
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
}
