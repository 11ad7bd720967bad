//! Saved state of the virtio-mmio transport and its queues, for snapshots
//! and migration. Devices save their own part (see each device's
//! `persist.rs`); the VMM stores both.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use super::mmio::{new_queues, MmioTransport};
use super::VirtioDevice;
use crate::{GuestMemory, Interrupt};

/// Version of [`MmioState`]; a restore refuses any other.
pub const MMIO_STATE_VERSION: u32 = 1;

/// Errors restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("virtio-mmio state version {found} is not supported (expected {expected})")]
    Version { found: u32, expected: u32 },
    #[error("virtio-mmio state is for device type {saved}, the device is type {device}")]
    DeviceType { saved: u32, device: u32 },
    #[error("virtio-mmio state holds {saved} queues, the device has {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("virtio-mmio state: queue {index}: {source}")]
    Queue {
        index: usize,
        source: virtio_queue::Error,
    },
    #[error("virtio-mmio state: acked features {acked:#x} exceed the device's {offered:#x}")]
    Features { acked: u64, offered: u64 },
    #[error("virtio-mmio: creating queue EventFds: {0}")]
    EventFd(#[source] std::io::Error),
}

/// One split virtqueue: addresses, size and ring positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl QueueSnapshot {
    pub fn of(queue: &Queue) -> Self {
        let s = queue.state();
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }

    /// Rebuilds the queue, validating sizes and address alignment.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// The transport's registers and queues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub version: u32,
    pub device_type: u32,
    pub status: u32,
    pub acked_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Stops the device's worker (see [`MmioTransport::pause`]) and returns
    /// the transport's state. Call [`MmioTransport::resume`] to go on.
    pub fn save(&mut self) -> MmioState {
        self.pause();
        MmioState {
            version: MMIO_STATE_VERSION,
            device_type: self.device.device_type(),
            status: self.status,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
        }
    }

    /// Rebuilds a transport around `device` (itself restored from its own
    /// state). The worker is not started: call [`MmioTransport::resume`]
    /// when the guest is about to run; it then picks up requests the guest
    /// made available before the save.
    pub fn restore(
        device: D,
        mem: GuestMemory,
        irq: Arc<dyn Interrupt>,
        state: &MmioState,
    ) -> Result<Self, TransportError> {
        let mut transport =
            MmioTransport::new(device, mem, irq).map_err(TransportError::EventFd)?;
        transport.load_state(state)?;
        Ok(transport)
    }

    /// Puts a saved state into this (stopped) transport, keeping its
    /// device, interrupt line and queue EventFds: what a VMM does that
    /// placed the device before the state arrived. The worker is not
    /// started: call [`MmioTransport::resume`].
    pub fn load_state(&mut self, state: &MmioState) -> Result<(), TransportError> {
        if state.version != MMIO_STATE_VERSION {
            return Err(TransportError::Version {
                found: state.version,
                expected: MMIO_STATE_VERSION,
            });
        }
        if state.device_type != self.device.device_type() {
            return Err(TransportError::DeviceType {
                saved: state.device_type,
                device: self.device.device_type(),
            });
        }
        let offered = self.device.avail_features();
        if state.acked_features & !offered != 0 {
            return Err(TransportError::Features {
                acked: state.acked_features,
                offered,
            });
        }
        let expected = new_queues(&self.device).len();
        if state.queues.len() != expected {
            return Err(TransportError::QueueCount {
                saved: state.queues.len(),
                device: expected,
            });
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                q.to_queue()
                    .map_err(|source| TransportError::Queue { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.pause();
        self.queues = queues;
        self.status = state.status;
        self.acked_features = state.acked_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.interrupt.set_status(state.interrupt_status);
        Ok(())
    }
}
