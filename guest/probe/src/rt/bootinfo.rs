//! What the PVH loader handed over in `hvm_start_info` (Xen's
//! `arch-x86/hvm/start_info.h`): the command line, the memory map and the
//! ACPI RSDP address. Copied out first thing, because the loader may have
//! put them in low memory that the probe later reuses (the AP trampoline).

use core::fmt;

const START_INFO_MAGIC: u32 = 0x336e_c578;
const MAX_CMDLINE: usize = 2048;
const MAX_REGIONS: usize = 64;
/// The boot page tables map this much; the probe ignores RAM above it.
pub const MAPPED_LIMIT: u64 = 4 << 30;
pub const E820_RAM: u32 = 1;

#[derive(Debug)]
pub enum BootInfoError {
    BadMagic { paddr: u64, magic: u32 },
    NoMemoryMap { version: u32 },
    Unmapped { what: &'static str, paddr: u64 },
    CmdlineNotUtf8,
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::BadMagic { paddr, magic } => write!(
                f,
                "hvm_start_info at {paddr:#x} has magic {magic:#x}, expected {START_INFO_MAGIC:#x} (not booted through PVH?)"
            ),
            Self::NoMemoryMap { version } => write!(
                f,
                "hvm_start_info version {version} carries no memory map (need version 1 with memmap_paddr)"
            ),
            Self::Unmapped { what, paddr } => {
                write!(f, "hvm_start_info {what} at {paddr:#x} lies above the 4 GiB the probe maps")
            }
            Self::CmdlineNotUtf8 => write!(f, "the kernel command line is not UTF-8"),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct MemRegion {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct BootInfo {
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    regions: [MemRegion; MAX_REGIONS],
    region_count: usize,
    /// 0 when the loader passed none.
    pub rsdp_paddr: u64,
}

/// Reads a `T` from guest-physical memory below 4 GiB (identity mapped).
fn read_phys<T: Copy>(paddr: u64) -> T {
    // SAFETY: callers check `paddr` lies below MAPPED_LIMIT, which the boot
    // page tables map; unaligned reads are allowed on x86.
    unsafe { (paddr as *const T).read_unaligned() }
}

fn check_mapped(what: &'static str, paddr: u64, len: u64) -> Result<(), BootInfoError> {
    match paddr.checked_add(len) {
        Some(end) if end <= MAPPED_LIMIT => Ok(()),
        _ => Err(BootInfoError::Unmapped { what, paddr }),
    }
}

impl BootInfo {
    /// Copies the loader's data out of `hvm_start_info` at `paddr`.
    pub fn read(paddr: u64) -> Result<Self, BootInfoError> {
        check_mapped("structure", paddr, 56)?;
        let magic: u32 = read_phys(paddr);
        if magic != START_INFO_MAGIC {
            return Err(BootInfoError::BadMagic { paddr, magic });
        }
        let version: u32 = read_phys(paddr + 4);
        let cmdline_paddr: u64 = read_phys(paddr + 24);
        let rsdp_paddr: u64 = read_phys(paddr + 32);
        if version < 1 {
            return Err(BootInfoError::NoMemoryMap { version });
        }
        let memmap_paddr: u64 = read_phys(paddr + 40);
        let memmap_entries: u32 = read_phys(paddr + 48);

        let mut info = BootInfo {
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            regions: [MemRegion::default(); MAX_REGIONS],
            region_count: 0,
            rsdp_paddr,
        };
        if cmdline_paddr != 0 {
            check_mapped("command line", cmdline_paddr, MAX_CMDLINE as u64)?;
            while info.cmdline_len < MAX_CMDLINE {
                let byte: u8 = read_phys(cmdline_paddr + info.cmdline_len as u64);
                if byte == 0 {
                    break;
                }
                info.cmdline[info.cmdline_len] = byte;
                info.cmdline_len += 1;
            }
        }
        let entries = (memmap_entries as usize).min(MAX_REGIONS);
        check_mapped("memory map", memmap_paddr, entries as u64 * 24)?;
        for i in 0..entries {
            let entry = memmap_paddr + i as u64 * 24;
            info.regions[i] = MemRegion {
                addr: read_phys(entry),
                size: read_phys(entry + 8),
                kind: read_phys(entry + 16),
            };
        }
        info.region_count = entries;
        Ok(info)
    }

    pub fn cmdline(&self) -> Result<&str, BootInfoError> {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len])
            .map_err(|_| BootInfoError::CmdlineNotUtf8)
    }

    pub fn regions(&self) -> &[MemRegion] {
        &self.regions[..self.region_count]
    }

    /// RAM below 4 GiB in bytes, as the memory map reports it.
    pub fn ram_below_4g(&self) -> u64 {
        self.regions()
            .iter()
            .filter(|r| r.kind == E820_RAM)
            .map(|r| {
                r.addr
                    .saturating_add(r.size)
                    .min(MAPPED_LIMIT)
                    .saturating_sub(r.addr.min(MAPPED_LIMIT))
            })
            .sum()
    }

    /// Whether `[addr, addr + len)` lies inside one RAM region.
    pub fn is_ram(&self, addr: u64, len: u64) -> bool {
        self.regions().iter().any(|r| {
            r.kind == E820_RAM
                && r.addr <= addr
                && addr.saturating_add(len) <= r.addr.saturating_add(r.size)
        })
    }

    /// The largest RAM range below 4 GiB at or above `floor`, 4 KiB aligned.
    pub fn largest_free_ram(&self, floor: u64) -> Option<(u64, u64)> {
        self.regions()
            .iter()
            .filter(|r| r.kind == E820_RAM)
            .filter_map(|r| {
                let start = r.addr.max(floor).next_multiple_of(4096);
                let end = r.addr.saturating_add(r.size).min(MAPPED_LIMIT) & !4095;
                (end > start).then(|| (start, end - start))
            })
            .max_by_key(|&(_, len)| len)
    }
}
