//! The virtio-mmio transport, version 2 (virtio 1.x) register layout.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateContext, DeviceInterrupt, QueueSnapshot, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::{BusDevice, GuestMemory, Interrupt};

/// Bytes of MMIO space one device occupies (registers plus config space).
pub const MMIO_SIZE: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4f58_5654; // "OXVT"

// Register offsets (virtio 1.2, 4.2.2).
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Where the driver notifies a queue; register the queue EventFds here.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// A virtio device on the MMIO bus. The VMM registers it on its bus at a
/// base address, registers [`MmioTransport::queue_events`] as ioeventfds at
/// base + 0x50 (datamatch = queue index), and backs `irq` with an irqfd.
pub struct MmioTransport<D: VirtioDevice> {
    pub(super) device: D,
    pub(super) mem: GuestMemory,
    pub(super) interrupt: Arc<DeviceInterrupt>,
    pub(super) queues: Vec<Queue>,
    pub(super) queue_events: Vec<EventFd>,
    pub(super) status: u32,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    pub(super) acked_features: u64,
    pub(super) queue_sel: u32,
    pub(super) config_generation: u32,
    /// The device's worker runs.
    pub(super) active: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    pub fn new(device: D, mem: GuestMemory, irq: Arc<dyn Interrupt>) -> std::io::Result<Self> {
        let queues = new_queues(&device);
        let queue_events = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(DeviceInterrupt::new(irq)),
            queues,
            queue_events,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
        })
    }

    /// Replaces the interrupt line (for a VMM that allocates the line when it
    /// places the device on its bus). Refused while the device runs.
    pub fn set_interrupt(&mut self, irq: Arc<dyn Interrupt>) -> Result<(), Arc<dyn Interrupt>> {
        if self.active {
            return Err(irq);
        }
        let status = self.interrupt.status();
        self.interrupt = Arc::new(DeviceInterrupt::new(irq));
        self.interrupt.set_status(status);
        Ok(())
    }

    /// One EventFd per queue, in queue order: the VMM registers each as an
    /// ioeventfd at base + [`REG_QUEUE_NOTIFY`] with the queue index as
    /// datamatch. A plain MMIO write to QueueNotify signals the same EventFd.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// Where QueueNotify sits relative to the device's base address.
    pub fn queue_notify_offset() -> u64 {
        REG_QUEUE_NOTIFY
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The device status register (ACKNOWLEDGE, DRIVER, FEATURES_OK, ...).
    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Changes the device's configuration (e.g. link status) and tells the
    /// driver: the generation counter moves and a config interrupt fires.
    pub fn update_config<R>(&mut self, change: impl FnOnce(&mut D) -> R) -> R {
        let result = change(&mut self.device);
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        }
        result
    }

    /// Stops the worker, keeping queue state, so that the device can be
    /// saved; [`MmioTransport::resume`] restarts it.
    pub fn pause(&mut self) {
        if !self.active {
            return;
        }
        self.active = false;
        match self.device.deactivate() {
            Some(queues) => self.queues = queues,
            None => self.fail("the worker died; the device needs a reset"),
        }
    }

    /// Restarts the worker after [`MmioTransport::pause`] or a restore.
    pub fn resume(&mut self) {
        if !self.active && self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let sel = self.queue_sel as usize;
        let queue = self.queues.get_mut(sel);
        if queue.is_none() {
            tracing::warn!("virtio-mmio: queue {sel} selected but does not exist");
        }
        queue
    }

    /// Queue registers may change after FEATURES_OK while the device is not
    /// running (before DRIVER_OK, or after a queue was torn down).
    fn queue_config_allowed(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.active
    }

    /// QueueReady. Writing 0 while the device runs is a driver tearing the
    /// queue down (virtio-drivers does so on drop, and reads the register
    /// until it says 0): the device stops, so it never touches the rings
    /// again, and stays stopped until a reset.
    fn write_queue_ready(&mut self, v: u32) {
        if v == 0 && self.active {
            self.pause();
        }
        self.update_queue(|q| q.set_ready(v == 1));
    }

    fn update_queue(&mut self, change: impl FnOnce(&mut Queue)) {
        if !self.queue_config_allowed() {
            tracing::warn!(
                "virtio-mmio: queue register written in status {:#x}; ignored",
                self.status
            );
            return;
        }
        if let Some(q) = self.selected_queue() {
            change(q);
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            // No shared memory regions: length all ones means "none".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH => u32::MAX,
            _ => {
                tracing::warn!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => self.write_driver_features(v),
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => self.update_queue(|q| q.set_size(v as u16)),
            REG_QUEUE_READY => self.write_queue_ready(v),
            REG_QUEUE_DESC_LOW => self.update_queue(|q| q.set_desc_table_address(Some(v), None)),
            REG_QUEUE_DESC_HIGH => self.update_queue(|q| q.set_desc_table_address(None, Some(v))),
            REG_QUEUE_DRIVER_LOW => self.update_queue(|q| q.set_avail_ring_address(Some(v), None)),
            REG_QUEUE_DRIVER_HIGH => self.update_queue(|q| q.set_avail_ring_address(None, Some(v))),
            REG_QUEUE_DEVICE_LOW => self.update_queue(|q| q.set_used_ring_address(Some(v), None)),
            REG_QUEUE_DEVICE_HIGH => self.update_queue(|q| q.set_used_ring_address(None, Some(v))),
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(v),
            REG_STATUS => self.write_status(v),
            _ => tracing::warn!("virtio-mmio: write of {v:#x} to unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            tracing::warn!("virtio-mmio: driver features written after FEATURES_OK; ignored");
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            sel => {
                tracing::warn!("virtio-mmio: driver features word {sel} does not exist");
                return;
            }
        };
        self.acked_features &= !(0xffff_ffffu64 << shift);
        self.acked_features |= u64::from(v) << shift;
    }

    fn notify(&mut self, queue: u32) {
        match self.queue_events.get(queue as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::error!("virtio-mmio: signalling queue {queue} failed: {e}");
                }
            }
            None => tracing::warn!("virtio-mmio: notify for nonexistent queue {queue}"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let added = v & !self.status;
        if v & self.status != self.status {
            tracing::warn!(
                "virtio-mmio: status {v:#x} clears bits of {:#x} without a reset; ignored",
                self.status
            );
            return;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            // Leaving FEATURES_OK unset tells the driver we refuse.
            self.status = v & !VIRTIO_CONFIG_S_FEATURES_OK;
            return;
        }
        self.status = v;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.avail_features();
        let unknown = self.acked_features & !offered;
        if unknown != 0 {
            tracing::warn!("virtio-mmio: driver accepted unoffered features {unknown:#x}");
            return false;
        }
        if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            tracing::warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)");
            return false;
        }
        true
    }

    fn fail(&mut self, why: &str) {
        tracing::error!("virtio-mmio device {}: {why}", self.device.device_type());
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    pub(super) fn activate(&mut self) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return self.fail("DRIVER_OK without FEATURES_OK");
        }
        if let Some(i) = self.queues.iter().position(|q| !q.is_valid(&self.mem)) {
            return self.fail(&format!(
                "queue {i} is not ready or lies outside guest memory"
            ));
        }
        let queue_events = match self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
        {
            Ok(evts) => evts,
            Err(e) => return self.fail(&format!("cloning queue EventFds: {e}")),
        };
        let event_idx = self.acked_features & super::VIRTIO_RING_F_EVENT_IDX != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        let queues = match self
            .queues
            .iter()
            .map(|q| QueueSnapshot::of(q).to_queue())
            .collect()
        {
            Ok(queues) => queues,
            Err(e) => return self.fail(&format!("copying queue state: {e}")),
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => self.active = true,
            Err(e) => self.fail(&e.to_string()),
        }
    }

    /// Back to the state before the driver's first access, as a driver
    /// writing 0 to Status does; also what a machine reset does.
    pub fn reset(&mut self) {
        if self.active {
            self.device.deactivate();
            self.active = false;
        }
        self.queues = new_queues(&self.device);
        for evt in &self.queue_events {
            // Drop notifications that arrived for the old queues.
            let _ = evt.read();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.interrupt.set_status(0);
    }
}

pub(super) fn new_queues(device: &impl VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .into_iter()
        .filter_map(|max| match Queue::new(max) {
            Ok(q) => Some(q),
            Err(e) => {
                tracing::error!("virtio: device offers an invalid queue size {max}: {e}");
                None
            }
        })
        .collect()
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            return self.device.read_config(offset - REG_CONFIG, data);
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::warn!(
                "virtio-mmio: {}-byte read at {offset:#x}; registers are 32-bit",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            return self.device.write_config(offset - REG_CONFIG, data);
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                "virtio-mmio: {}-byte write at {offset:#x}; registers are 32-bit",
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            tracing::warn!("virtio-mmio: unaligned write at {offset:#x}");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

impl<D: VirtioDevice> Drop for MmioTransport<D> {
    fn drop(&mut self) {
        if self.active {
            self.device.deactivate();
        }
    }
}
