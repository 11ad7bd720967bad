//! The GDT and identity-mapped page tables the boot vCPU starts with.

use devices::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::layout;

/// Boot GDT: null, 32-bit code (0x08), 64-bit code (0x10), data (0x18),
/// TSS (0x20). PVH enters with CS=0x08, the 64-bit boot protocol with the
/// kernel's __BOOT_CS=0x10 and __BOOT_DS=0x18.
pub const GDT: [u64; 5] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0067,
];
pub const CODE32_SELECTOR: u16 = 0x08;
pub const CODE64_SELECTOR: u16 = 0x10;
pub const DATA_SELECTOR: u16 = 0x18;
pub const TSS_SELECTOR: u16 = 0x20;

pub fn write_gdt(mem: &GuestMemory) -> Result<(), GuestMemoryError> {
    for (i, entry) in GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::GDT_ADDR + 8 * i as u64))?;
    }
    Ok(())
}

/// Identity-maps the first 1 GiB with 2 MiB pages (PML4 -> PDPT -> PD).
pub fn write_identity_page_tables(mem: &GuestMemory) -> Result<(), GuestMemoryError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    mem.write_obj(
        layout::PDPT_ADDR | PRESENT_RW,
        GuestAddress(layout::PML4_ADDR),
    )?;
    mem.write_obj(
        layout::PD_ADDR | PRESENT_RW,
        GuestAddress(layout::PDPT_ADDR),
    )?;
    for i in 0..512u64 {
        mem.write_obj(
            (i << 21) | PRESENT_RW | HUGE,
            GuestAddress(layout::PD_ADDR + i * 8),
        )?;
    }
    Ok(())
}
