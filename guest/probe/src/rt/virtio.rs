//! virtio for the workloads: the `virtio-drivers` HAL over the probe's
//! identity map (physical = virtual, ring 3 may touch every page below
//! 4 GiB), DMA pages from a bump allocator over free RAM, and the devices
//! the command line names (`virtio_mmio.device=`). Interrupts are off, so
//! drivers poll their used rings.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use oxvirt_probe::bootinfo::BootInfo;
use oxvirt_probe::virtio_mmio;
use virtio_drivers::transport::mmio::{MmioError, MmioTransport, VirtIOHeader};
use virtio_drivers::transport::{DeviceType, DeviceTypeError, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use super::fail::Fail;
use crate::fail;

extern "C" {
    /// End of the probe's image (link.ld): free RAM starts above it.
    static __image_end: u8;
}

/// The device ID of a virtio-mmio slot with no device behind it (QEMU
/// microvm has 24 slots, most of them empty).
const NO_DEVICE: u32 = 0;

/// Next free byte and end of the DMA range (0, 0 until `init`).
static NEXT: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);

/// Hands the largest free RAM range above the image to the DMA allocator.
pub fn init(boot: &BootInfo) {
    let floor = core::ptr::addr_of!(__image_end) as u64;
    let (start, len) = boot.largest_free_ram(floor).unwrap_or((floor, 0));
    NEXT.store(start, Ordering::Relaxed);
    END.store(start + len, Ordering::Relaxed);
}

/// `bytes` (rounded up to whole pages) of zeroed DMA memory, never freed:
/// a run sets up its devices and buffers once.
pub fn alloc(bytes: usize) -> Result<&'static mut [u8], Fail> {
    let len = bytes.next_multiple_of(PAGE_SIZE) as u64;
    let start = NEXT
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |next| {
            next.checked_add(len)
                .filter(|&end| end <= END.load(Ordering::Relaxed))
        })
        .map_err(|next| {
            Fail::new(format_args!(
                "out of guest RAM for DMA buffers: {bytes} bytes wanted, {} free",
                END.load(Ordering::Relaxed).saturating_sub(next)
            ))
        })?;
    // SAFETY: [start, start + len) is RAM per the memory map, above the
    // image, below 4 GiB (identity mapped), and handed out only once.
    let buf = unsafe { core::slice::from_raw_parts_mut(start as *mut u8, len as usize) };
    buf.fill(0);
    Ok(buf)
}

/// The probe's HAL: addresses are identity mapped, DMA comes from `alloc`.
pub struct ProbeHal;

// SAFETY: `dma_alloc` hands out zeroed, page-aligned, otherwise unused
// memory whose physical address equals its virtual address; `share` returns
// the physical address of memory the device may then access in place.
unsafe impl Hal for ProbeHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        // The drivers allocate only their rings (a few pages); a guest with
        // too little RAM for those ends in `PROBE DONE fail: panic ...`.
        let buf = alloc(pages * PAGE_SIZE)
            .unwrap_or_else(|fail| panic!("virtio ring allocation: {}", fail.as_str()));
        let ptr = NonNull::from(buf).cast::<u8>();
        (ptr.as_ptr() as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        // Bump allocation: the memory stays reserved until the VM ends.
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("virtio-drivers never maps MMIO at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// The first virtio-mmio device of `kind` among the command line's
/// `virtio_mmio.device=` entries. Other devices, and empty slots (device
/// ID 0, which Linux skips too), are left untouched.
pub fn find(boot: &BootInfo, kind: DeviceType) -> Result<MmioTransport<'static>, Fail> {
    let cmdline = boot.cmdline()?;
    let mut seen = 0;
    for device in virtio_mmio::devices(cmdline) {
        let device = device?;
        seen += 1;
        let header = NonNull::new(device.base as *mut VirtIOHeader)
            .ok_or_else(|| Fail::new(format_args!("virtio-mmio device at address 0")))?;
        // SAFETY: the VMM announced a virtio-mmio register block of `size`
        // bytes at `base`, below 4 GiB (checked by the parser), which the
        // boot page tables map; nothing else in the probe touches it.
        match unsafe { MmioTransport::new(header, device.size as usize) } {
            Ok(transport) if transport.device_type() == kind => return Ok(transport),
            Ok(_)
            | Err(MmioError::InvalidDeviceID(DeviceTypeError::InvalidDeviceType(NO_DEVICE))) => {}
            Err(err) => return fail!("virtio-mmio device at {:#x}: {err}", device.base),
        }
    }
    fail!("no virtio-mmio {kind:?} device among the {seen} virtio_mmio.device=<size>@<base>:<irq> entries on the command line")
}
