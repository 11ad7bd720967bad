//! Page senders: each reads its share of guest memory, turns zero pages
//! into runs and writes RAM sections on its own stream. The main thread
//! has one for a single connection; with multifd every channel thread has
//! its own (see multifd.rs), so pages are read, checked and written in
//! parallel. All of them report into one [`Progress`].

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use super::pagemap::{Pagemap, CHUNK_PAGES};
use super::params::{RamStats, XbzrleStats};
use super::source::{DirtyBitmap, MigrationControl, SourceError};
use super::stream::{PageData, RamBatch, SectionKind, StreamWriter};
use super::xbzrle::{Encoder, Outcome, XbzrleCounters};
use super::PAGE_SIZE;

/// Pages per shard. Sender k of n sends the shards whose number modulo n
/// is k, so a page always travels on the same channel and its versions
/// arrive in order. A shard is a huge page: one pagemap read.
pub(super) const SHARD_PAGES: u64 = CHUNK_PAGES as u64;
const SHARD_BYTES: u64 = SHARD_PAGES * PAGE_SIZE as u64;

/// What one pass sends.
#[derive(Clone)]
pub(super) enum Work {
    /// Every page of these regions (guest address, pages): the first pass.
    Bulk(Arc<Vec<(u64, u64)>>),
    /// The pages set in this bitmap.
    Dirty(Arc<DirtyBitmap>),
}

/// Bandwidth: measured over 100 ms windows, held to max-bandwidth by
/// every sender together.
pub(super) struct RateMeter {
    limit: f64,
    window_start: Instant,
    window_bytes: u64,
    window_pages: u64,
    rate: Option<f64>,
    pages_per_second: u64,
}

const WINDOW: Duration = Duration::from_millis(100);

impl RateMeter {
    pub(super) fn new(limit: u64) -> Self {
        RateMeter {
            limit: limit as f64,
            window_start: Instant::now(),
            window_bytes: 0,
            window_pages: 0,
            rate: None,
            pages_per_second: 0,
        }
    }

    /// Accounts sent bytes; returns how long the sender must wait to stay
    /// within the limit.
    pub(super) fn account(&mut self, bytes: u64, pages: u64) -> Duration {
        self.window_bytes += bytes;
        self.window_pages += pages;
        let due =
            self.window_start + Duration::from_secs_f64(self.window_bytes as f64 / self.limit);
        let wait = due.saturating_duration_since(Instant::now());
        let elapsed = self.window_start.elapsed() + wait;
        if elapsed >= WINDOW {
            let secs = elapsed.as_secs_f64();
            self.rate = Some(self.window_bytes as f64 / secs);
            self.pages_per_second = (self.window_pages as f64 / secs) as u64;
            self.window_start = Instant::now() + wait;
            self.window_bytes = 0;
            self.window_pages = 0;
        }
        wait
    }

    /// The last full window's bytes per second.
    pub(super) fn rate(&self) -> Option<f64> {
        self.rate
    }
}

/// What a sender did since its last section.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// Pages handled (sent, or unchanged under XBZRLE).
    pages: u64,
    duplicate: u64,
    normal: u64,
}

/// The numbers behind `query-migrate`'s ram and xbzrle-cache members,
/// shared by the main thread and the senders.
struct Counters {
    ram: RamStats,
    /// Pages of the current pass not sent yet.
    pending: u64,
    xbzrle: Option<XbzrleStats>,
}

/// Where senders report what they sent and wait for bandwidth.
pub(super) struct Progress<'c> {
    control: &'c MigrationControl,
    counters: Mutex<Counters>,
    meter: Mutex<RateMeter>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<'c> Progress<'c> {
    pub(super) fn new(control: &'c MigrationControl, ram_total: u64, max_bandwidth: u64) -> Self {
        Progress {
            control,
            counters: Mutex::new(Counters {
                ram: RamStats {
                    total: ram_total,
                    ..RamStats::default()
                },
                pending: 0,
                xbzrle: None,
            }),
            meter: Mutex::new(RateMeter::new(max_bandwidth)),
        }
    }

    pub(super) fn cancelled(&self) -> bool {
        self.control.cancelled()
    }

    /// A pass of `pages` pages begins.
    pub(super) fn start_pass(&self, pages: u64) {
        locked(&self.counters).pending = pages;
    }

    /// The RAM statistics so far.
    pub(super) fn ram(&self) -> RamStats {
        locked(&self.counters).ram
    }

    /// Changes the statistics the main thread keeps (sync count, rates).
    pub(super) fn update(&self, f: impl FnOnce(&mut RamStats)) {
        f(&mut locked(&self.counters).ram);
        self.publish();
    }

    /// The measured bandwidth of the last window.
    pub(super) fn rate(&self) -> Option<f64> {
        locked(&self.meter).rate()
    }

    /// The final stage: the guest is stopped, the rest goes at full speed (as QEMU).
    pub(super) fn unlimit(&self) {
        locked(&self.meter).limit = f64::INFINITY;
    }

    /// A sender wrote a section of `bytes` bytes: account, publish, pace.
    fn sent(&self, bytes: u64, tally: Tally, xbzrle: Option<XbzrleStats>) {
        {
            let mut c = locked(&self.counters);
            c.ram.transferred += bytes;
            c.ram.duplicate += tally.duplicate;
            c.ram.normal += tally.normal;
            c.ram.normal_bytes += tally.normal * PAGE_SIZE as u64;
            c.pending = c.pending.saturating_sub(tally.pages);
            if xbzrle.is_some() {
                c.xbzrle = xbzrle;
            }
        }
        self.publish();
        let wait = locked(&self.meter).account(bytes, tally.pages);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    /// Updates what `query-migrate` shows.
    pub(super) fn publish(&self) {
        let pages_per_second = locked(&self.meter).pages_per_second;
        let (mut ram, pending, xbzrle) = {
            let c = locked(&self.counters);
            (c.ram, c.pending, c.xbzrle)
        };
        ram.remaining = pending * PAGE_SIZE as u64;
        ram.pages_per_second = pages_per_second;
        let throttle = self.control.throttle_percentage();
        self.control.update(|i| {
            i.ram = Some(ram);
            i.xbzrle_cache = xbzrle;
            i.cpu_throttle_percentage = (throttle > 0).then_some(throttle);
        });
    }
}

fn xbzrle_stats(c: XbzrleCounters, cache_size: u64) -> XbzrleStats {
    XbzrleStats {
        cache_size,
        bytes: c.bytes,
        pages: c.pages,
        cache_miss: c.cache_miss,
        cache_miss_rate: if c.lookups == 0 {
            0.0
        } else {
            c.cache_miss as f64 / c.lookups as f64
        },
        encoding_rate: if c.bytes == 0 {
            0.0
        } else {
            (c.pages * PAGE_SIZE as u64) as f64 / c.bytes as f64
        },
        overflow: c.overflow,
    }
}

/// XBZRLE for the pages of one sender (single connection only).
pub(super) struct Xbzrle {
    pub(super) encoder: Encoder,
    pub(super) cache_size: u64,
    /// A private copy of the page: the cache must hold exactly what was sent.
    page: Vec<u8>,
}

impl Xbzrle {
    pub(super) fn new(cache_size: u64) -> Self {
        Xbzrle {
            encoder: Encoder::new(cache_size),
            cache_size,
            page: vec![0; PAGE_SIZE],
        }
    }
}

/// Sends this sender's share of each pass on one stream.
pub(super) struct PageSender<W: Write> {
    stream: StreamWriter<W>,
    /// This sender takes the shards with `shard % of == index`.
    index: u64,
    of: u64,
    batch: RamBatch,
    tally: Tally,
    xbzrle: Option<Xbzrle>,
    pagemap: Pagemap,
    untouched: Vec<bool>,
}

impl<W: Write> PageSender<W> {
    /// Sender `index` of `of` (0 of 1: every page).
    pub(super) fn new(
        stream: StreamWriter<W>,
        index: u64,
        of: u64,
        xbzrle: Option<Xbzrle>,
    ) -> Self {
        PageSender {
            stream,
            index,
            of: of.max(1),
            batch: RamBatch::default(),
            tally: Tally::default(),
            xbzrle,
            pagemap: Pagemap::open(),
            untouched: Vec::with_capacity(CHUNK_PAGES),
        }
    }

    pub(super) fn stream(&mut self) -> &mut StreamWriter<W> {
        &mut self.stream
    }

    pub(super) fn into_stream(self) -> StreamWriter<W> {
        self.stream
    }

    fn owns(&self, addr: u64) -> bool {
        (addr / SHARD_BYTES) % self.of == self.index
    }

    /// Sends this sender's share of `work`; `sync` is the dirty-sync count
    /// (XBZRLE's cache age). Returns once it is all written.
    pub(super) fn run(
        &mut self,
        memory: &GuestMemory,
        work: &Work,
        progress: &Progress,
        sync: u64,
    ) -> Result<(), SourceError> {
        match work {
            Work::Bulk(regions) => self.bulk(memory, regions, progress)?,
            Work::Dirty(bitmap) => self.dirty(memory, bitmap, progress, sync)?,
        }
        self.flush(progress)?;
        self.stream.flush()?;
        Ok(())
    }

    /// The first pass: every page; pages nobody touched go as zero unread.
    fn bulk(
        &mut self,
        memory: &GuestMemory,
        regions: &[(u64, u64)],
        progress: &Progress,
    ) -> Result<(), SourceError> {
        for &(start, pages) in regions {
            let end = start + pages * PAGE_SIZE as u64;
            let mut first = start;
            while first < end {
                let last = ((first / SHARD_BYTES + 1) * SHARD_BYTES).min(end);
                if self.owns(first) {
                    self.bulk_shard(memory, first, last, progress)?;
                }
                first = last;
            }
        }
        Ok(())
    }

    fn bulk_shard(
        &mut self,
        memory: &GuestMemory,
        first: u64,
        last: u64,
        progress: &Progress,
    ) -> Result<(), SourceError> {
        let count = ((last - first) / PAGE_SIZE as u64) as usize;
        let mut untouched = std::mem::take(&mut self.untouched);
        self.pagemap.untouched(memory, first, count, &mut untouched);
        let sent = (untouched.iter().enumerate()).try_for_each(|(i, &untouched)| {
            let addr = first + (i * PAGE_SIZE) as u64;
            if untouched {
                self.tally.duplicate += 1;
                self.tally.pages += 1;
                self.batch.push_zero(addr);
                self.flush_if_full(progress)
            } else {
                self.page(memory, addr, None, progress)
            }
        });
        self.untouched = untouched;
        sent
    }

    fn dirty(
        &mut self,
        memory: &GuestMemory,
        bitmap: &DirtyBitmap,
        progress: &Progress,
        sync: u64,
    ) -> Result<(), SourceError> {
        for (base, words) in bitmap {
            for (wi, &word) in words.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    let addr = base + (wi as u64 * 64 + bit) * PAGE_SIZE as u64;
                    if self.owns(addr) {
                        self.page(memory, addr, Some(sync), progress)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// One page; `sync` is set in dirty passes, where XBZRLE applies.
    fn page(
        &mut self,
        memory: &GuestMemory,
        addr: u64,
        sync: Option<u64>,
        progress: &Progress,
    ) -> Result<(), SourceError> {
        let read_err = |e: vm_memory::GuestMemoryError| SourceError::Memory {
            addr,
            problem: e.to_string(),
        };
        self.tally.pages += 1;
        match (self.xbzrle.as_mut(), sync) {
            (Some(x), Some(sync)) => {
                memory
                    .read_slice(&mut x.page, GuestAddress(addr))
                    .map_err(read_err)?;
                if super::is_zero(&x.page) {
                    x.encoder.zero_page(addr);
                    self.tally.duplicate += 1;
                    self.batch.push_zero(addr);
                } else {
                    match x.encoder.save_page(addr, &x.page, sync) {
                        Outcome::Unchanged => {}
                        Outcome::Encoded => self
                            .batch
                            .push(addr, &PageData::Xbzrle(x.encoder.encoded())),
                        Outcome::Full => {
                            self.tally.normal += 1;
                            self.batch.push(addr, &PageData::Full(&x.page));
                        }
                    }
                }
            }
            _ => {
                // Read straight into the batch: a guest write racing with
                // the copy dirties the page again, so it is sent again.
                let zero = self
                    .batch
                    .push_read(addr, |buf| memory.read_slice(buf, GuestAddress(addr)))
                    .map_err(read_err)?;
                if zero {
                    self.tally.duplicate += 1;
                } else {
                    self.tally.normal += 1;
                }
            }
        }
        self.flush_if_full(progress)
    }

    fn flush_if_full(&mut self, progress: &Progress) -> Result<(), SourceError> {
        if self.batch.is_full() {
            self.flush(progress)?;
        }
        Ok(())
    }

    /// Writes the batch as a RAM section.
    fn flush(&mut self, progress: &Progress) -> Result<(), SourceError> {
        if progress.cancelled() {
            return Err(SourceError::Cancelled);
        }
        let tally = std::mem::take(&mut self.tally);
        if self.batch.is_empty() {
            progress.sent(0, tally, None);
            return Ok(());
        }
        let payload = self.batch.take();
        let bytes = self.stream.section(SectionKind::Ram, &payload)?;
        self.batch.recycle(payload);
        let xbzrle = (self.xbzrle.as_ref()).map(|x| xbzrle_stats(x.encoder.counters, x.cache_size));
        progress.sent(bytes, tally, xbzrle);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_meter_holds_the_limit() {
        let mut meter = RateMeter::new(10 << 20);
        let start = Instant::now();
        for _ in 0..8 {
            std::thread::sleep(meter.account(256 << 10, 64));
        }
        // 2 MiB at 10 MiB/s takes at least 200 ms.
        assert!(
            start.elapsed() >= Duration::from_millis(195),
            "{:?}",
            start.elapsed()
        );
        let rate = meter.rate().unwrap();
        assert!(rate < 12.0 * (1 << 20) as f64, "{rate}");
    }

    #[test]
    fn shards_split_memory_between_senders() {
        let senders: Vec<_> = (0..3)
            .map(|i| PageSender::new(StreamWriter::new(Vec::new()).unwrap(), i, 3, None))
            .collect();
        for page in (0..4 * SHARD_PAGES).step_by(97) {
            let addr = page * PAGE_SIZE as u64;
            let owners: Vec<u64> = (senders.iter())
                .filter(|s| s.owns(addr))
                .map(|s| s.index)
                .collect();
            assert_eq!(owners, [(page / SHARD_PAGES) % 3], "page {page}");
        }
    }
}
