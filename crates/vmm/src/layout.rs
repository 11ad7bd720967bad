//! The guest-physical address map, shared by the boot loaders, the ACPI
//! tables and the device manager.
//!
//! ```text
//! 0x0000_0500  GDT (boot)             0x0000_6000  hvm_start_info (PVH)
//! 0x0000_7000  boot_params (bzImage)  0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, PDPT, PD         0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)        0x000e_0000  ACPI tables (reserved)
//! 0x000f_0000  MP table (reserved)    0x0010_0000  kernel (bzImage)
//! ...          RAM up to 3 GiB
//! 0xc000_0000  MMIO hole: virtio-mmio slots at 0xd000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 4 GiB
//! ```

pub const PAGE_SIZE: u64 = 4096;
pub const GDT_ADDR: u64 = 0x500;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Linux's COMMAND_LINE_SIZE on x86, terminating NUL included.
pub const CMDLINE_MAX: usize = 2048;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
/// The MP floating pointer and table, in the BIOS area Linux scans.
pub const MPTABLE_ADDR: u64 = 0xf0000;
pub const ACPI_END: u64 = 0x100000;
pub const HIMEM_START: u64 = 0x100000;
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// virtio-mmio device slots (4 KiB each) inside the MMIO hole.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SLOT: u64 = 0x1000;
pub const VIRTIO_MMIO_SLOTS: u64 = 32;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS and identity-map pages, required below 4 GiB on Intel.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// GSIs the in-kernel IOAPIC has; legacy ISA devices use 0-15.
pub const IOAPIC_PINS: u32 = 24;
/// First GSI given to virtio-mmio devices (below are ISA devices).
pub const VIRTIO_FIRST_GSI: u32 = 5;

/// RAM ranges for `size` bytes of guest memory: below the MMIO hole, then
/// the remainder above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

/// One e820 entry: start, length, type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The memory map the guest sees (e820 for bzImage, the PVH memmap).
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let ram = |addr, size| E820Entry {
        addr,
        size,
        kind: E820_RAM,
    };
    let mut map = vec![
        ram(0, EBDA_START),
        E820Entry {
            addr: ACPI_START,
            size: ACPI_END - ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in ram_ranges(size) {
        let start = start.max(HIMEM_START);
        let end = if start >= MMIO_HOLE_END {
            start + len
        } else {
            len
        };
        if end > start {
            map.push(ram(start, end - start));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_range_and_map_skips_legacy_holes() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
        let map = e820_map(64 << 20);
        assert_eq!(map[0].addr, 0);
        assert_eq!(map[0].size, EBDA_START);
        assert_eq!(map[2].addr, HIMEM_START);
        assert_eq!(map[2].addr + map[2].size, 64 << 20);
    }

    #[test]
    fn big_guest_splits_around_the_mmio_hole() {
        let size = 5u64 << 30;
        assert_eq!(
            ram_ranges(size),
            vec![
                (0, MMIO_HOLE_START),
                (MMIO_HOLE_END, size - MMIO_HOLE_START)
            ]
        );
        let map = e820_map(size);
        let high = map.last().unwrap();
        assert_eq!(high.addr, MMIO_HOLE_END);
        assert_eq!(high.size, size - MMIO_HOLE_START);
        let total: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(total, size - (HIMEM_START - EBDA_START));
    }
}
