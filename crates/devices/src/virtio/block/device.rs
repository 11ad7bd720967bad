//! The virtio-blk device and its worker.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use diskimg::{BlockDevice, IoBuf};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request::{
    self, check_sectors, Parsed, Request, RequestType, Segment, DISCARD_SEGMENT_SIZE, SECTOR_SIZE,
};
use super::{BlockConfig, BlockCounters, BlockError, BlockStats, CacheMode};
use crate::rate_limiter::{epoll_timeout, LimiterConfig, RateLimiter};
use crate::virtio::worker::{drain, EventLoop, QueueServer, WorkerThread, KICK_RACE_GRACE_MS};
use crate::virtio::{
    read_config_bytes, ActivateContext, ActivateError, DeviceInterrupt, VirtioDevice,
    COMMON_FEATURES,
};
use crate::GuestMemory;

/// Largest discard / write-zeroes request, in sectors (QEMU's limit).
const MAX_DISCARD_SECTORS: u32 = 0x3f_ffff;
/// Segments one discard / write-zeroes request may carry.
const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Length of the configuration space we fill (up to write_zeroes_may_unmap).
const CONFIG_LEN: usize = 60;

/// State shared by the device, its worker and [`BlockHandle`]s.
struct Shared {
    read_limiter: Mutex<RateLimiter>,
    write_limiter: Mutex<RateLimiter>,
    counters: BlockCounters,
    /// Wakes the worker after a throttle change.
    kick: EventFd,
}

fn lock(limiter: &Mutex<RateLimiter>) -> MutexGuard<'_, RateLimiter> {
    // A panic while holding the lock leaves a limiter that is still valid.
    limiter
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A handle for the control socket: counters and run-time throttle changes,
/// usable from any thread while the device runs.
#[derive(Clone)]
pub struct BlockHandle {
    shared: Arc<Shared>,
}

impl BlockHandle {
    pub fn stats(&self) -> BlockStats {
        self.shared.counters.snapshot()
    }

    /// (read, write) limits in force.
    pub fn throttle(&self) -> (LimiterConfig, LimiterConfig) {
        (
            lock(&self.shared.read_limiter).config(),
            lock(&self.shared.write_limiter).config(),
        )
    }

    /// Replaces the limits; requests waiting under the old ones retry at once.
    pub fn set_throttle(
        &self,
        read: LimiterConfig,
        write: LimiterConfig,
    ) -> Result<(), BlockError> {
        RateLimiter::new(read)?;
        RateLimiter::new(write)?;
        lock(&self.shared.read_limiter).update(read)?;
        lock(&self.shared.write_limiter).update(write)?;
        self.shared.kick.write(1).map_err(BlockError::EventFd)
    }
}

/// A virtio-blk device (one request queue).
pub struct Block {
    disk: Arc<dyn BlockDevice>,
    config: BlockConfig,
    read_only: bool,
    capacity: u64,
    config_space: Vec<u8>,
    shared: Arc<Shared>,
    write_behind: Option<Arc<File>>,
    worker: Option<WorkerThread<BlockWorker>>,
}

impl Block {
    pub fn new(disk: Arc<dyn BlockDevice>, config: BlockConfig) -> Result<Self, BlockError> {
        if config
            .serial
            .as_ref()
            .is_some_and(|s| s.len() > VIRTIO_BLK_ID_BYTES as usize)
        {
            return Err(BlockError::SerialTooLong {
                serial: config.serial.clone().unwrap_or_default(),
            });
        }
        if !config.queue_size.is_power_of_two()
            || config.queue_size < 2
            || config.queue_size > 32768
        {
            return Err(BlockError::QueueSize(config.queue_size));
        }
        let shared = Arc::new(Shared {
            read_limiter: Mutex::new(RateLimiter::new(config.read_limit)?),
            write_limiter: Mutex::new(RateLimiter::new(config.write_limit)?),
            counters: BlockCounters::default(),
            kick: EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?,
        });
        let read_only = config.read_only || disk.read_only();
        let capacity = disk.size() / SECTOR_SIZE;
        let mut block = Block {
            disk,
            config,
            read_only,
            capacity,
            config_space: Vec::new(),
            shared,
            write_behind: None,
            worker: None,
        };
        block.config_space = block.build_config_space();
        Ok(block)
    }

    /// With cache=writeback, starts the host's writeback of `image` (the
    /// file the guest's writes dirty) every [`WRITE_BEHIND_BYTES`] the guest
    /// writes, so that a guest flush waits only for what was written since
    /// instead of everything; the disk then writes while the guest does.
    /// Other cache modes leave no dirty pages to the flush (none,
    /// writethrough) or ignore flushes (unsafe): no effect there.
    pub fn set_write_behind(&mut self, image: File) {
        self.write_behind = (self.config.cache == CacheMode::Writeback).then(|| Arc::new(image));
    }

    pub fn handle(&self) -> BlockHandle {
        BlockHandle {
            shared: self.shared.clone(),
        }
    }

    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Disk size in 512-byte sectors (a partial last sector is not visible).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Makes every completed write durable whatever the cache mode (even
    /// `unsafe`): what a snapshot or a migration does after
    /// [`crate::virtio::MmioTransport::save`] stopped the worker, so that
    /// the destination opening the image sees all the guest wrote.
    pub fn flush_disk(&self) -> diskimg::Result<()> {
        self.disk.flush()
    }

    /// Opens the image anew under a stopped device: what a migration's
    /// destination does once the source has flushed, so that no metadata
    /// read before the stream is used. The size must not change.
    pub fn replace_disk(&mut self, disk: Arc<dyn BlockDevice>) -> Result<(), BlockError> {
        let now = disk.size() / SECTOR_SIZE;
        if now != self.capacity {
            return Err(BlockError::CapacityChanged {
                saved: self.capacity,
                now,
            });
        }
        self.read_only = self.config.read_only || disk.read_only();
        self.disk = disk;
        Ok(())
    }

    fn build_config_space(&self) -> Vec<u8> {
        let mut c = vec![0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &self.capacity.to_le_bytes());
        put(12, &u32::from(self.config.queue_size - 2).to_le_bytes()); // seg_max
        put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    fn serial_bytes(&self) -> Vec<u8> {
        self.config.serial.clone().unwrap_or_default().into_bytes()
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.config.queue_size]
    }

    fn avail_features(&self) -> u64 {
        let bit = |b: u32| 1u64 << b;
        let mut f = COMMON_FEATURES
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::warn!(
            "virtio-blk: {}-byte write to read-only config at {offset:#x}; ignored",
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        const DEVICE: &str = "virtio-blk";
        let got = ctx.queues.len();
        let (Some(queue), Some(queue_evt)) = (
            ctx.queues.into_iter().next(),
            ctx.queue_events.into_iter().next(),
        ) else {
            return Err(ActivateError::QueueCount {
                device: DEVICE,
                expected: 1,
                got,
            });
        };
        let kick = self
            .shared
            .kick
            .try_clone()
            .map_err(|source| ActivateError::EventFd {
                device: DEVICE,
                source,
            })?;
        let worker = BlockWorker {
            mem: ctx.mem,
            queue,
            queue_evt,
            kick,
            interrupt: ctx.interrupt,
            disk: self.disk.clone(),
            shared: self.shared.clone(),
            cache: self.config.cache,
            read_only: self.read_only,
            capacity: self.capacity,
            serial: self.serial_bytes(),
            throttled: false,
            write_behind: self.write_behind.clone().map(WriteBehind::new),
        };
        let thread = WorkerThread::spawn(DEVICE, move |stop| worker.run(stop))?;
        self.worker = Some(thread);
        Ok(())
    }

    fn deactivate(&mut self) -> Option<Vec<Queue>> {
        let worker = self.worker.take()?.stop()?;
        lock(&self.shared.read_limiter).clear_retry();
        lock(&self.shared.write_limiter).clear_retry();
        Some(vec![worker.queue])
    }
}

/// Outcome of one request: the status byte and how many bytes the device
/// wrote into the guest's buffers (before the status).
struct Completion {
    status: u8,
    written: u32,
}

impl Completion {
    fn ok(written: u32) -> Self {
        Completion {
            status: VIRTIO_BLK_S_OK as u8,
            written,
        }
    }

    fn status(status: u32) -> Self {
        Completion {
            status: status as u8,
            written: 0,
        }
    }
}

const TOKEN_STOP: u64 = 0;
const TOKEN_QUEUE: u64 = 1;
const TOKEN_KICK: u64 = 2;

struct BlockWorker {
    mem: GuestMemory,
    queue: Queue,
    queue_evt: EventFd,
    kick: EventFd,
    interrupt: Arc<DeviceInterrupt>,
    disk: Arc<dyn BlockDevice>,
    shared: Arc<Shared>,
    cache: CacheMode,
    read_only: bool,
    capacity: u64,
    serial: Vec<u8>,
    /// A request waits for a rate limiter.
    throttled: bool,
    write_behind: Option<WriteBehind>,
}

/// Bytes the guest writes between two starts of the host's writeback.
pub const WRITE_BEHIND_BYTES: u64 = 1 << 20;
/// Only writes this large count: streams. Small scattered writes are
/// better left to the flush, where the elevator sorts and merges them.
pub const WRITE_BEHIND_MIN_REQUEST: u64 = 64 << 10;

/// Starts writeback of an image's dirty pages (`sync_file_range`, which
/// queues the I/O and returns) every [`WRITE_BEHIND_BYTES`] written.
struct WriteBehind {
    image: Arc<File>,
    pending: u64,
}

impl WriteBehind {
    fn new(image: Arc<File>) -> Self {
        WriteBehind { image, pending: 0 }
    }

    fn wrote(&mut self, bytes: u64) {
        self.pending += bytes;
        if self.pending < WRITE_BEHIND_BYTES {
            return;
        }
        self.pending = 0;
        // The whole file: a qcow2 image's clusters lie elsewhere than the
        // guest's offsets, and pages already under writeback are skipped.
        // SAFETY: plain syscall on an open descriptor; no memory passed.
        let rc = unsafe {
            libc::sync_file_range(self.image.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
        };
        if rc != 0 {
            // Only a hint: the guest's flush still syncs everything.
            tracing::debug!(
                "virtio-blk: starting writeback: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

impl BlockWorker {
    fn run(mut self, stop: EventFd) -> Self {
        let mut events = match self.event_loop(&stop) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("virtio-blk worker: epoll set-up failed: {e}");
                return self;
            }
        };
        // Requests made available before we started (e.g. after a restore).
        self.process_queue();
        // Every pass holds notifications back (see `QueueServer::recheck`).
        let mut recheck = true;
        loop {
            let timeout = if self.throttled {
                epoll_timeout([
                    lock(&self.shared.read_limiter).retry_at(),
                    lock(&self.shared.write_limiter).retry_at(),
                ])
            } else if recheck {
                KICK_RACE_GRACE_MS
            } else {
                -1
            };
            let tokens = match events.wait(timeout) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!("virtio-blk worker: epoll_wait failed: {e}");
                    return self;
                }
            };
            if tokens.is_empty() && !self.throttled && recheck {
                recheck = false;
                if !self.recheck() {
                    continue;
                }
            }
            for token in tokens {
                match token {
                    TOKEN_STOP => return self,
                    TOKEN_QUEUE => drain(&self.queue_evt),
                    _ => drain(&self.kick),
                }
            }
            self.process_queue();
            recheck = true;
        }
    }

    fn event_loop(&self, stop: &EventFd) -> std::io::Result<EventLoop> {
        let events = EventLoop::new()?;
        events.add(stop, TOKEN_STOP)?;
        events.add(&self.queue_evt, TOKEN_QUEUE)?;
        events.add(&self.kick, TOKEN_KICK)?;
        Ok(events)
    }

    /// Asks the request's direction's limiter for its bytes and one op.
    fn admit(&self, req: &Request) -> bool {
        let limiter = match req.kind {
            RequestType::In => &self.shared.read_limiter,
            RequestType::Out => &self.shared.write_limiter,
            _ => return true,
        };
        lock(limiter).consume(req.data_len())
    }

    /// Runs the request, writes its status; returns the used length.
    fn complete(&mut self, parsed: Parsed) -> u32 {
        let completion = match parsed.request {
            Ok(req) => self.execute(&req),
            Err(e) => {
                tracing::warn!("virtio-blk: bad request: {e}");
                Completion::status(VIRTIO_BLK_S_IOERR)
            }
        };
        if completion.status != VIRTIO_BLK_S_OK as u8 {
            self.shared.counters.error();
        }
        let Some(status_addr) = parsed.status else {
            return 0;
        };
        match self.mem.write_obj(completion.status, status_addr) {
            Ok(()) => completion.written + 1,
            Err(e) => {
                tracing::warn!("virtio-blk: writing the status byte: {e}");
                0
            }
        }
    }

    fn execute(&mut self, req: &Request) -> Completion {
        let result = match req.kind {
            RequestType::In => self.read(req),
            RequestType::Out => self.write(req),
            RequestType::Flush => self.flush(),
            RequestType::GetId => self.get_id(req),
            RequestType::Discard | RequestType::WriteZeroes => self.discard_or_zero(req),
            RequestType::Unsupported(t) => {
                tracing::debug!("virtio-blk: unsupported request type {t}");
                return Completion::status(VIRTIO_BLK_S_UNSUPP);
            }
        };
        result.unwrap_or_else(Completion::status)
    }

    /// Reads straight into the guest's buffers (no bounce buffer where
    /// the image format allows, see `BlockDevice::read_vectored_at`).
    fn read(&mut self, req: &Request) -> Result<Completion, u32> {
        let start = Instant::now();
        let (disk, offset) = (&self.disk, req.sector * SECTOR_SIZE);
        with_guest_bufs(&self.mem, &req.data, true, |bufs| {
            disk.read_vectored_at(bufs, offset)
        })
        .map_err(|e| io_error("read into guest memory", &e))?
        .map_err(|e| io_error("read", &e))?;
        let total = req.data_len();
        self.shared.counters.read_done(total, elapsed_ns(start));
        Ok(Completion::ok(total as u32))
    }

    /// Writes straight from the guest's buffers.
    fn write(&mut self, req: &Request) -> Result<Completion, u32> {
        if self.read_only {
            tracing::debug!("virtio-blk: write to a read-only disk refused");
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let start = Instant::now();
        let (disk, offset) = (&self.disk, req.sector * SECTOR_SIZE);
        with_guest_bufs(&self.mem, &req.data, false, |bufs| {
            disk.write_vectored_at(bufs, offset)
        })
        .map_err(|e| io_error("write from guest memory", &e))?
        .map_err(|e| io_error("write", &e))?;
        if self.cache == CacheMode::Writethrough {
            self.disk
                .flush()
                .map_err(|e| io_error("flush after write", &e))?;
        }
        if let Some(wb) = &mut self.write_behind {
            if req.data_len() >= WRITE_BEHIND_MIN_REQUEST {
                wb.wrote(req.data_len());
            }
        }
        self.shared
            .counters
            .write_done(req.data_len(), elapsed_ns(start));
        Ok(Completion::ok(0))
    }

    fn flush(&mut self) -> Result<Completion, u32> {
        let start = Instant::now();
        if self.cache != CacheMode::Unsafe {
            self.disk.flush().map_err(|e| io_error("flush", &e))?;
        }
        self.shared.counters.flush_done(elapsed_ns(start));
        Ok(Completion::ok(0))
    }

    fn get_id(&mut self, req: &Request) -> Result<Completion, u32> {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        id[..self.serial.len()].copy_from_slice(&self.serial);
        let mut written = 0usize;
        for seg in &req.data {
            let n = (seg.len as usize).min(id.len() - written);
            self.mem
                .write_slice(&id[written..written + n], seg.addr)
                .map_err(|e| io_error("GET_ID", &e))?;
            written += n;
        }
        Ok(Completion::ok(written as u32))
    }

    fn discard_or_zero(&mut self, req: &Request) -> Result<Completion, u32> {
        if self.read_only {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let start = Instant::now();
        let segments = self.discard_segments(req)?;
        let mut bytes = 0;
        for (sector, count, flags) in segments {
            let unmap_allowed = if req.kind == RequestType::Discard {
                0
            } else {
                1
            };
            if flags & !unmap_allowed != 0 || count > MAX_DISCARD_SECTORS as u64 {
                return Err(VIRTIO_BLK_S_UNSUPP);
            }
            check_sectors(sector, count * SECTOR_SIZE, self.capacity).map_err(|e| {
                tracing::warn!("virtio-blk: {e}");
                VIRTIO_BLK_S_IOERR
            })?;
            let (offset, len) = (sector * SECTOR_SIZE, count * SECTOR_SIZE);
            let result = match req.kind {
                RequestType::Discard => self.disk.discard(offset, len),
                _ => self.disk.write_zeroes(offset, len),
            };
            result.map_err(|e| io_error("discard/write-zeroes", &e))?;
            bytes += len;
        }
        self.shared.counters.write_done(bytes, elapsed_ns(start));
        Ok(Completion::ok(0))
    }

    /// Reads the (sector, num_sectors, flags) segments of a discard or
    /// write-zeroes request.
    fn discard_segments(&self, req: &Request) -> Result<Vec<(u64, u64, u32)>, u32> {
        let len = req.data_len();
        if len == 0
            || !len.is_multiple_of(DISCARD_SEGMENT_SIZE)
            || len / DISCARD_SEGMENT_SIZE > u64::from(MAX_DISCARD_SEGMENTS)
        {
            tracing::warn!("virtio-blk: discard/write-zeroes payload of {len} bytes");
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let mut raw = Vec::with_capacity(len as usize);
        for seg in &req.data {
            let mut part = vec![0u8; seg.len as usize];
            self.mem
                .read_slice(&mut part, seg.addr)
                .map_err(|e| io_error("reading discard segments", &e))?;
            raw.extend_from_slice(&part);
        }
        Ok(raw
            .chunks_exact(DISCARD_SEGMENT_SIZE as usize)
            .map(|s| {
                let word = |r: std::ops::Range<usize>| {
                    s[r].iter()
                        .rev()
                        .fold(0u64, |acc, &b| acc << 8 | u64::from(b))
                };
                (word(0..8), word(8..12), word(12..16) as u32)
            })
            .collect())
    }
}

impl QueueServer for BlockWorker {
    const NAME: &'static str = "virtio-blk";
    /// A guest keeping requests in flight publishes the next one within
    /// microseconds of a completion; its notification would cost it a VM
    /// exit (~21 us here). QEMU's IOThread polls 32 us by default.
    const POLL: Duration = Duration::from_micros(32);

    fn queue_and_memory(&mut self) -> (&mut Queue, &GuestMemory) {
        (&mut self.queue, &self.mem)
    }

    fn interrupt(&self) -> &DeviceInterrupt {
        &self.interrupt
    }

    fn serve_available(&mut self) -> bool {
        let mut used_any = false;
        self.throttled = false;
        while let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let parsed = request::parse(chain, self.capacity);
            // Each completion lets the driver publish one more request:
            // keep avail_event a ring ahead of what was taken.
            self.hold_notifications();
            if let Ok(req) = &parsed.request {
                if !self.admit(req) {
                    self.queue.go_to_previous_position();
                    self.throttled = true;
                    break;
                }
            }
            let used_len = self.complete(parsed);
            if let Err(e) = self.queue.add_used(&self.mem, head, used_len) {
                tracing::warn!("virtio-blk: adding descriptor {head} to the used ring: {e}");
            }
            used_any = true;
        }
        used_any
    }
    fn throttled(&self) -> bool {
        self.throttled
    }
}

/// Runs `io` on the guest buffers `data` as diskimg [`IoBuf`]s; if
/// `device_writes`, marks their pages dirty in the memory's bitmap (what
/// vm-memory's own writes do) for migration, whatever `io` returned.
fn with_guest_bufs<T>(
    mem: &GuestMemory,
    data: &[Segment],
    device_writes: bool,
    io: impl FnOnce(&[IoBuf<'_>]) -> T,
) -> Result<T, GuestMemoryError> {
    let mut slices = Vec::with_capacity(data.len());
    for seg in data {
        // A buffer may span memory regions: one slice per region.
        for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
            slices.push(slice?);
        }
    }
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let bufs: Vec<IoBuf<'_>> = guards
        .iter()
        // SAFETY: each guard's range is a mapped, writable guest memory
        // slice (`get_slices` checked it lies in guest memory), and `mem`
        // and the guards outlive `bufs`. The guest may change these bytes
        // while the disk I/O runs; diskimg only passes them to preadv /
        // pwritev or copies them with raw pointer copies (as vm-memory's
        // own copies do), never through a Rust reference, so a racing guest
        // sees or leaves unspecified bytes in its own buffer, nothing worse.
        .map(|g| unsafe { IoBuf::new(g.as_ptr(), g.len()) })
        .collect();
    let out = io(&bufs);
    if device_writes {
        for s in &slices {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
    Ok(out)
}

fn io_error(what: &str, e: &dyn std::fmt::Display) -> u32 {
    tracing::warn!("virtio-blk: {what} failed: {e}");
    VIRTIO_BLK_S_IOERR
}

fn elapsed_ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
