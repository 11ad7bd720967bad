//! Every device of the VM: the port-I/O and MMIO buses the vCPUs dispatch
//! to, the legacy devices on them, interrupt lines (irqfds), and the
//! virtio-mmio slots (address, GSI, kernel command-line announcement).

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::legacy::{AcpiSleepControl, DebugExit, Serial, VmRequestSink, I8042};
use devices::virtio::{MmioTransport, VirtioDevice};
use devices::{BusDevice, GuestMemory, Interrupt};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::layout;

/// Errors of device set-up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already there")]
    Overlap { base: u64, len: u64 },
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("registering irqfd for GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("registering ioeventfd at {addr:#x}: {source}")]
    Ioeventfd {
        addr: u64,
        source: kvm_ioctls::Error,
    },
    #[error("no free virtio-mmio slot or interrupt line left ({0} devices at most)")]
    NoSlot(u64),
}

/// A shared, lockable device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

struct BusEntry {
    len: u64,
    device: SharedDevice,
}

/// An address space of devices (port I/O or MMIO), keyed by base address.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, BusEntry>,
}

impl Bus {
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), DeviceError> {
        let overlaps_before = self
            .devices
            .range(..=base)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        let overlaps_after = self
            .devices
            .range(base..)
            .next()
            .is_some_and(|(b, _)| *b < base + len);
        if len == 0 || overlaps_before || overlaps_after {
            return Err(DeviceError::Overlap { base, len });
        }
        self.devices.insert(base, BusEntry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, entry) = self.devices.range(..=addr).next_back()?;
        (addr < base + entry.len).then_some((addr - base, &entry.device))
    }

    /// Reads from the device at `addr`; unclaimed addresses read all ones,
    /// as on a PC bus with nothing driving it. Returns whether one answered.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes to the device at `addr`; unclaimed writes are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device; a device whose lock was poisoned by a panicking vCPU
/// thread is still used (device models keep their state consistent).
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The two buses the vCPU threads dispatch exits to.
#[derive(Default)]
pub struct IoBuses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// An interrupt line backed by an irqfd: raising it is one eventfd write,
/// and KVM injects the interrupt without involving a vCPU thread.
pub struct IrqLine {
    gsi: u32,
    event: EventFd,
}

impl IrqLine {
    pub fn new(vm: &VmFd, gsi: u32) -> Result<Self, DeviceError> {
        let event = EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        vm.register_irqfd(&event, gsi)
            .map_err(|source| DeviceError::Irqfd { gsi, source })?;
        Ok(IrqLine { gsi, event })
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }
}

impl Interrupt for IrqLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.event.write(1)
    }
}

/// Where a virtio-mmio device was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

impl MmioSlot {
    /// The Linux command-line parameter that announces the device.
    pub fn cmdline_param(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            self.len >> 10,
            self.base,
            self.gsi
        )
    }
}

/// Builds the buses and owns the devices' host-side handles.
pub struct DeviceManager {
    buses: IoBuses,
    serial: Arc<Mutex<Serial>>,
    mmio_slots: Vec<MmioSlot>,
    /// Keeps queue-notify eventfds registered with KVM alive.
    ioeventfds: Vec<EventFd>,
}

impl DeviceManager {
    /// Creates the legacy devices: COM1 (to `serial_out`), i8042,
    /// debug-exit at 0xf4 and the ACPI sleep-control register.
    pub fn new(
        vm: &VmFd,
        serial_out: Box<dyn Write + Send>,
        sink: Arc<dyn VmRequestSink>,
    ) -> Result<Self, DeviceError> {
        let com1_irq = Arc::new(IrqLine::new(vm, Serial::COM1_IRQ)?);
        let serial = Arc::new(Mutex::new(Serial::new(com1_irq, serial_out)));
        let mut buses = IoBuses::default();
        let pio = &mut buses.pio;
        pio.insert(Serial::COM1.into(), Serial::SIZE.into(), serial.clone())?;
        pio.insert(
            I8042::PORT.into(),
            I8042::SIZE.into(),
            Arc::new(Mutex::new(I8042::new(sink.clone()))),
        )?;
        pio.insert(
            DebugExit::PORT.into(),
            DebugExit::SIZE.into(),
            Arc::new(Mutex::new(DebugExit::new(sink.clone()))),
        )?;
        pio.insert(
            AcpiSleepControl::PORT.into(),
            AcpiSleepControl::SIZE.into(),
            Arc::new(Mutex::new(AcpiSleepControl::new(sink))),
        )?;
        Ok(DeviceManager {
            buses,
            serial,
            mmio_slots: Vec::new(),
            ioeventfds: Vec::new(),
        })
    }

    /// The serial port, for feeding host input to the guest.
    pub fn serial(&self) -> Arc<Mutex<Serial>> {
        self.serial.clone()
    }

    /// Puts `device` behind a virtio-mmio transport in the next 4 KiB slot
    /// with the next free GSI (an irqfd), its queue notifications as
    /// ioeventfds, and returns the transport for the VMM to keep.
    pub fn add_virtio<D: VirtioDevice + 'static>(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        device: D,
    ) -> Result<Arc<Mutex<MmioTransport<D>>>, DeviceError> {
        let index = self.mmio_slots.len() as u64;
        let gsi = layout::VIRTIO_FIRST_GSI + index as u32;
        if index >= layout::VIRTIO_MMIO_SLOTS || gsi >= layout::IOAPIC_PINS {
            return Err(DeviceError::NoSlot(index));
        }
        let slot = MmioSlot {
            base: layout::VIRTIO_MMIO_START + index * layout::VIRTIO_MMIO_SLOT,
            len: layout::VIRTIO_MMIO_SLOT,
            gsi,
        };
        let irq = Arc::new(IrqLine::new(vm, gsi)?);
        let transport =
            MmioTransport::new(device, mem.clone(), irq).map_err(DeviceError::EventFd)?;
        let notify = slot.base + MmioTransport::<D>::queue_notify_offset();
        for (queue, event) in (0u32..).zip(transport.queue_events()) {
            let event = event.try_clone().map_err(DeviceError::EventFd)?;
            self.add_queue_notify(vm, notify, queue, event)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.buses
            .mmio
            .insert(slot.base, slot.len, transport.clone())?;
        self.mmio_slots.push(slot);
        Ok(transport)
    }

    /// Lets KVM signal `event` on a guest write of `queue` to the
    /// QueueNotify register at `addr`, without an exit to the VMM.
    fn add_queue_notify(
        &mut self,
        vm: &VmFd,
        addr: u64,
        queue: u32,
        event: EventFd,
    ) -> Result<(), DeviceError> {
        vm.register_ioevent(&event, &IoEventAddress::Mmio(addr), queue)
            .map_err(|source| DeviceError::Ioeventfd { addr, source })?;
        self.ioeventfds.push(event);
        Ok(())
    }

    /// Kernel command-line parameters announcing the virtio-mmio devices.
    pub fn cmdline_params(&self) -> Vec<String> {
        self.mmio_slots
            .iter()
            .map(MmioSlot::cmdline_param)
            .collect()
    }

    /// Hands the buses to the vCPU threads (no device is added after).
    pub fn into_buses(self) -> (Arc<IoBuses>, Arc<Mutex<Serial>>) {
        (Arc::new(self.buses), self.serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn bus_dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::default();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Echo(1))))
            .unwrap();
        bus.insert(0x110, 0x10, Arc::new(Mutex::new(Echo(7))))
            .unwrap();
        assert!(bus.insert(0x10f, 2, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus
            .insert(0xf8, 0x9, Arc::new(Mutex::new(Echo(0))))
            .is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x110, &[40]));
        bus.read(0x111, &mut b);
        assert_eq!(b[0], 41);
        assert!(!bus.read(0x120, &mut b));
        assert_eq!(b[0], 0xff);
    }

    #[test]
    fn mmio_slot_announcement() {
        let slot = MmioSlot {
            base: 0xd000_1000,
            len: 0x1000,
            gsi: 6,
        };
        assert_eq!(slot.cmdline_param(), "virtio_mmio.device=4K@0xd0001000:6");
    }
}
