//! Virtio devices behind a virtio-mmio transport (virtio 1.x, split
//! virtqueues through the virtio-queue crate).
//!
//! A device implements [`VirtioDevice`]; [`MmioTransport`] gives it the
//! registers a driver sees and starts it on DRIVER_OK. Each active device
//! runs one worker thread that waits (epoll) on its queues' notification
//! EventFds, its back end and a stop EventFd, so no I/O runs on a vCPU thread.

pub mod block;
mod mmio;
pub mod net;
mod persist;
pub mod rng;
mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub use mmio::{MmioTransport, MMIO_SIZE};
pub use persist::{MmioState, QueueSnapshot, TransportError};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
pub use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::{GuestMemory, Interrupt};

/// Feature bit every device offers: virtio 1.x (no legacy interface).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Indirect descriptor tables; virtio-queue walks them for us.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// used_event/avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Features every device here offers.
pub const COMMON_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// Why a device could not start on DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("{device}: expected {expected} queues, got {got}")]
    QueueCount {
        device: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{device}: cloning a queue or stop EventFd: {source}")]
    EventFd {
        device: &'static str,
        source: std::io::Error,
    },
    #[error("{device}: setting up the worker's epoll: {source}")]
    Epoll {
        device: &'static str,
        source: std::io::Error,
    },
    #[error("{device}: spawning the worker thread: {source}")]
    Thread {
        device: &'static str,
        source: std::io::Error,
    },
    #[error("{device}: {what}")]
    Backend { device: &'static str, what: String },
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: GuestMemory,
    /// One per queue, configured and ready, in queue-index order.
    pub queues: Vec<Queue>,
    /// The queues' notification EventFds (clones of the transport's).
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<DeviceInterrupt>,
    /// Features the driver accepted (a subset of the device's).
    pub acked_features: u64,
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 block, 1 net, 4 entropy).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits offered to the driver.
    fn avail_features(&self) -> u64;
    /// Reads the device-specific configuration space; out-of-range bytes
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Driver writes to the configuration space (most fields are read-only).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the worker thread.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the worker thread, if one runs, and hands the queues back as
    /// they stand (indices included), for a later re-activation or a save.
    fn deactivate(&mut self) -> Option<Vec<Queue>>;
}

/// Copies `config[offset..]` into `data`, zero-filling what lies beyond it.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// The device's interrupt line plus the interrupt-status register it
/// drives; shared between the transport (vCPU side) and the worker.
pub struct DeviceInterrupt {
    status: AtomicU32,
    irq: Arc<dyn Interrupt>,
}

impl DeviceInterrupt {
    pub fn new(irq: Arc<dyn Interrupt>) -> Self {
        DeviceInterrupt {
            status: AtomicU32::new(0),
            irq,
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_MMIO_INT_VRING);
    }

    /// The configuration space changed.
    pub fn signal_config_change(&self) {
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.trigger() {
            tracing::error!("virtio: raising the interrupt failed: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}
