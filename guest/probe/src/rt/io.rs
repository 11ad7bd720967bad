//! Port I/O and MMIO. Ring 3 may use ports because the probe runs with
//! RFLAGS.IOPL=3; every access is a VM exit, so callers keep them few.

use core::arch::asm;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; IOPL=3 permits it in ring 3.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a 32-bit device register at physical address `addr` (identity mapped).
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: callers pass device register addresses below 4 GiB, which the
    // boot page tables map for ring 3; volatile keeps the access as written.
    unsafe { (addr as *const u32).read_volatile() }
}

/// Writes a 32-bit device register at physical address `addr` (identity mapped).
pub fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: as in `mmio_read32`.
    unsafe { (addr as *mut u32).write_volatile(value) }
}

/// Lets a sibling hyperthread run while this CPU spins.
pub fn pause() {
    core::hint::spin_loop();
}
