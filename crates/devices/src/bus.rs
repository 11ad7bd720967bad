use vm_memory::bitmap::AtomicBitmap;

/// Guest memory as the VMM and every device see it. The bitmap records pages
/// the VMM itself writes (virtio rings and buffers): live migration ORs it with
/// KVM's dirty log, since KVM only sees writes the guest's vCPUs make.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// A device on the MMIO or port-I/O bus. `offset` is relative to the base
/// address the device was registered at; accesses are 1, 2, 4 or 8 bytes.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// An interrupt line a device raises. The VMM backs it with an irqfd
/// registered with KVM, so raising it never involves a vCPU thread.
pub trait Interrupt: Send + Sync {
    fn trigger(&self) -> std::io::Result<()>;
}
