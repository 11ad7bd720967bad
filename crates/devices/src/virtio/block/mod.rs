//! virtio-blk over a [`diskimg::BlockDevice`].

mod device;
mod persist;
pub mod request;

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

pub use device::{Block, BlockHandle};
pub use persist::{BlockState, BLOCK_STATE_VERSION};
use serde::{Deserialize, Serialize};

use crate::rate_limiter::{self, LimiterConfig};

/// Errors creating or restoring a virtio-blk device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("virtio-blk: serial {serial:?} is longer than 20 bytes")]
    SerialTooLong { serial: String },
    #[error("virtio-blk: queue size {0} is not a power of two between 2 and 32768")]
    QueueSize(u16),
    #[error("virtio-blk: throttle: {0}")]
    Throttle(#[from] rate_limiter::Error),
    #[error("virtio-blk: creating an EventFd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("virtio-blk state version {found} is not supported (expected {expected})")]
    StateVersion { found: u32, expected: u32 },
    #[error("virtio-blk state: disk had {saved} sectors, the disk opened now has {now}")]
    CapacityChanged { saved: u64, now: u64 },
    #[error("virtio-blk: unknown cache mode {0:?} (none, writeback, writethrough, unsafe)")]
    CacheMode(String),
}

/// Host cache modes, as QEMU names and means them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Host page cache bypassed: the opener must open the image with
    /// `O_DIRECT` ([`CacheMode::direct_io`]); guest flushes reach the disk.
    None,
    /// Host page cache used; guest flushes reach the disk.
    #[default]
    Writeback,
    /// Every write is flushed before it completes.
    Writethrough,
    /// Guest flushes are ignored: fast, and data is lost on a host crash.
    Unsafe,
}

impl CacheMode {
    /// Whether the image should be opened with `O_DIRECT`.
    pub fn direct_io(self) -> bool {
        self == CacheMode::None
    }
}

impl FromStr for CacheMode {
    type Err = BlockError;

    fn from_str(s: &str) -> Result<Self, BlockError> {
        match s {
            "none" => Ok(CacheMode::None),
            "writeback" => Ok(CacheMode::Writeback),
            "writethrough" => Ok(CacheMode::Writethrough),
            "unsafe" => Ok(CacheMode::Unsafe),
            other => Err(BlockError::CacheMode(other.to_owned())),
        }
    }
}

/// How a disk is presented to the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// Answer to GET_ID, at most 20 bytes.
    pub serial: Option<String>,
    pub cache: CacheMode,
    /// Present the disk read-only even if the image is writable.
    pub read_only: bool,
    pub read_limit: LimiterConfig,
    pub write_limit: LimiterConfig,
    pub queue_size: u16,
}

impl Default for BlockConfig {
    fn default() -> Self {
        BlockConfig {
            serial: None,
            cache: CacheMode::default(),
            read_only: false,
            read_limit: LimiterConfig::default(),
            write_limit: LimiterConfig::default(),
            queue_size: 256,
        }
    }
}

/// Counters as `virsh domblkstat` shows them (times in nanoseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    pub rd_req: u64,
    pub rd_bytes: u64,
    pub wr_req: u64,
    pub wr_bytes: u64,
    pub flush_operations: u64,
    pub rd_total_times: u64,
    pub wr_total_times: u64,
    pub flush_total_times: u64,
    /// Requests that completed with an error status.
    pub errs: u64,
}

/// The live counters behind [`BlockStats`], updated by the worker.
#[derive(Debug, Default)]
pub(crate) struct BlockCounters {
    rd_req: AtomicU64,
    rd_bytes: AtomicU64,
    wr_req: AtomicU64,
    wr_bytes: AtomicU64,
    flush_operations: AtomicU64,
    rd_total_times: AtomicU64,
    wr_total_times: AtomicU64,
    flush_total_times: AtomicU64,
    errs: AtomicU64,
}

impl BlockCounters {
    fn add(counter: &AtomicU64, v: u64) {
        counter.fetch_add(v, Ordering::Relaxed);
    }

    pub(crate) fn read_done(&self, bytes: u64, ns: u64) {
        Self::add(&self.rd_req, 1);
        Self::add(&self.rd_bytes, bytes);
        Self::add(&self.rd_total_times, ns);
    }

    pub(crate) fn write_done(&self, bytes: u64, ns: u64) {
        Self::add(&self.wr_req, 1);
        Self::add(&self.wr_bytes, bytes);
        Self::add(&self.wr_total_times, ns);
    }

    pub(crate) fn flush_done(&self, ns: u64) {
        Self::add(&self.flush_operations, 1);
        Self::add(&self.flush_total_times, ns);
    }

    pub(crate) fn error(&self) {
        Self::add(&self.errs, 1);
    }

    pub(crate) fn snapshot(&self) -> BlockStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockStats {
            rd_req: get(&self.rd_req),
            rd_bytes: get(&self.rd_bytes),
            wr_req: get(&self.wr_req),
            wr_bytes: get(&self.wr_bytes),
            flush_operations: get(&self.flush_operations),
            rd_total_times: get(&self.rd_total_times),
            wr_total_times: get(&self.wr_total_times),
            flush_total_times: get(&self.flush_total_times),
            errs: get(&self.errs),
        }
    }
}
