//! What the PVH loader handed over in `hvm_start_info` (Xen's
//! `arch-x86/hvm/start_info.h`): the command line, the memory map and the
//! ACPI RSDP address. Copied out first thing, because the loader may have
//! put them in low memory that the probe later reuses (the AP trampoline).

use core::fmt;

use crate::{le, PhysMem};

const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Size of `hvm_start_info` version 1.
const START_INFO_LEN: u64 = 56;
const MEMMAP_ENTRY_LEN: u64 = 24;
pub const MAX_CMDLINE: usize = 2048;
pub const MAX_REGIONS: usize = 64;
/// The boot page tables map this much; the probe ignores RAM above it.
pub const MAPPED_LIMIT: u64 = 4 << 30;
pub const E820_RAM: u32 = 1;

#[derive(Debug, PartialEq)]
pub enum BootInfoError {
    Unreadable { what: &'static str, paddr: u64 },
    BadMagic { paddr: u64, magic: u32 },
    NoMemoryMap { version: u32 },
    TooManyRegions { entries: u32 },
    CmdlineTooLong,
    CmdlineNotUtf8,
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Unreadable { what, paddr } => {
                write!(f, "hvm_start_info {what} at {paddr:#x} lies outside the memory the probe maps")
            }
            Self::BadMagic { paddr, magic } => write!(
                f,
                "hvm_start_info at {paddr:#x} has magic {magic:#x}, expected {START_INFO_MAGIC:#x} (not booted through PVH?)"
            ),
            Self::NoMemoryMap { version } => write!(
                f,
                "hvm_start_info version {version} carries no memory map (need version 1 with memmap_paddr)"
            ),
            Self::TooManyRegions { entries } => {
                write!(f, "hvm_start_info memory map has {entries} entries, the probe takes at most {MAX_REGIONS}")
            }
            Self::CmdlineTooLong => write!(f, "the kernel command line is longer than {MAX_CMDLINE} bytes"),
            Self::CmdlineNotUtf8 => write!(f, "the kernel command line is not UTF-8"),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemRegion {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl MemRegion {
    fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

pub struct BootInfo {
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    regions: [MemRegion; MAX_REGIONS],
    region_count: usize,
    /// 0 when the loader passed none.
    pub rsdp_paddr: u64,
}

fn read<'m>(
    mem: &'m impl PhysMem,
    what: &'static str,
    paddr: u64,
    len: u64,
) -> Result<&'m [u8], BootInfoError> {
    mem.bytes(paddr, len)
        .ok_or(BootInfoError::Unreadable { what, paddr })
}

impl BootInfo {
    /// Copies the loader's data out of the `hvm_start_info` at `paddr`.
    pub fn read(mem: &impl PhysMem, paddr: u64) -> Result<Self, BootInfoError> {
        let info = read(mem, "structure", paddr, START_INFO_LEN)?;
        let field = |off, len| le(info, off, len);
        let magic = field(0, 4) as u32;
        if magic != START_INFO_MAGIC {
            return Err(BootInfoError::BadMagic { paddr, magic });
        }
        let version = field(4, 4) as u32;
        if version < 1 {
            return Err(BootInfoError::NoMemoryMap { version });
        }
        let mut boot = BootInfo {
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            regions: [MemRegion::default(); MAX_REGIONS],
            region_count: 0,
            rsdp_paddr: field(32, 8),
        };
        boot.read_cmdline(mem, field(24, 8))?;
        boot.read_memmap(mem, field(40, 8), field(48, 4) as u32)?;
        Ok(boot)
    }

    fn read_cmdline(&mut self, mem: &impl PhysMem, paddr: u64) -> Result<(), BootInfoError> {
        if paddr == 0 {
            return Ok(());
        }
        for len in 0..=MAX_CMDLINE {
            let byte = read(mem, "command line", paddr + len as u64, 1)?[0];
            if byte == 0 {
                self.cmdline_len = len;
                return Ok(());
            }
            *self
                .cmdline
                .get_mut(len)
                .ok_or(BootInfoError::CmdlineTooLong)? = byte;
        }
        Err(BootInfoError::CmdlineTooLong)
    }

    fn read_memmap(
        &mut self,
        mem: &impl PhysMem,
        paddr: u64,
        entries: u32,
    ) -> Result<(), BootInfoError> {
        if entries as usize > MAX_REGIONS {
            return Err(BootInfoError::TooManyRegions { entries });
        }
        let table = read(
            mem,
            "memory map",
            paddr,
            u64::from(entries) * MEMMAP_ENTRY_LEN,
        )?;
        for (slot, entry) in self
            .regions
            .iter_mut()
            .zip(table.chunks_exact(MEMMAP_ENTRY_LEN as usize))
        {
            *slot = MemRegion {
                addr: le(entry, 0, 8),
                size: le(entry, 8, 8),
                kind: le(entry, 16, 4) as u32,
            };
        }
        self.region_count = entries as usize;
        Ok(())
    }

    pub fn cmdline(&self) -> Result<&str, BootInfoError> {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len])
            .map_err(|_| BootInfoError::CmdlineNotUtf8)
    }

    pub fn regions(&self) -> &[MemRegion] {
        &self.regions[..self.region_count]
    }

    fn ram(&self) -> impl Iterator<Item = &MemRegion> {
        self.regions().iter().filter(|r| r.kind == E820_RAM)
    }

    /// RAM below 4 GiB in bytes, as the memory map reports it.
    pub fn ram_below_4g(&self) -> u64 {
        self.ram()
            .map(|r| {
                r.end()
                    .min(MAPPED_LIMIT)
                    .saturating_sub(r.addr.min(MAPPED_LIMIT))
            })
            .sum()
    }

    /// Whether `[addr, addr + len)` lies inside one RAM region.
    pub fn is_ram(&self, addr: u64, len: u64) -> bool {
        self.ram()
            .any(|r| r.addr <= addr && addr.saturating_add(len) <= r.end())
    }

    /// The largest RAM range below 4 GiB at or above `floor`, 4 KiB aligned.
    pub fn largest_free_ram(&self, floor: u64) -> Option<(u64, u64)> {
        self.ram()
            .filter_map(|r| {
                let start = r.addr.max(floor).checked_next_multiple_of(4096)?;
                let end = r.end().min(MAPPED_LIMIT) & !4095;
                (end > start).then(|| (start, end - start))
            })
            .max_by_key(|&(_, len)| len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmem::TestMem;

    const INFO: u64 = 0x1000;
    const CMDLINE: u64 = 0x2000;
    const MEMMAP: u64 = 0x3000;

    fn start_info(mem: &mut TestMem, version: u32, entries: u32) {
        let mut info = Vec::new();
        info.extend(START_INFO_MAGIC.to_le_bytes());
        info.extend(version.to_le_bytes());
        info.extend([0; 8]); // flags, nr_modules
        info.extend(0u64.to_le_bytes()); // modlist
        info.extend(CMDLINE.to_le_bytes());
        info.extend(0xf_0000u64.to_le_bytes()); // rsdp
        info.extend(MEMMAP.to_le_bytes());
        info.extend(entries.to_le_bytes());
        info.extend(0u32.to_le_bytes());
        mem.put(INFO, &info);
    }

    fn region(mem: &mut TestMem, index: u64, addr: u64, size: u64, kind: u32) {
        let mut entry = Vec::new();
        entry.extend(addr.to_le_bytes());
        entry.extend(size.to_le_bytes());
        entry.extend(kind.to_le_bytes());
        entry.extend(0u32.to_le_bytes());
        mem.put(MEMMAP + index * MEMMAP_ENTRY_LEN, &entry);
    }

    fn machine() -> TestMem {
        let mut mem = TestMem::new(0x10000);
        start_info(&mut mem, 1, 3);
        mem.put(CMDLINE, b"console=ttyS0 probe=hello\0");
        region(&mut mem, 0, 0, 0x9fc00, E820_RAM);
        region(&mut mem, 1, 0xf0000, 0x10000, 2);
        region(&mut mem, 2, 0x10_0000, 0x3f0_0000, E820_RAM);
        mem
    }

    #[test]
    fn reads_cmdline_memmap_and_rsdp() {
        let boot = BootInfo::read(&machine(), INFO).unwrap();
        assert_eq!(boot.cmdline(), Ok("console=ttyS0 probe=hello"));
        assert_eq!(boot.regions().len(), 3);
        assert_eq!(boot.rsdp_paddr, 0xf_0000);
        assert_eq!(boot.ram_below_4g(), 0x9fc00 + 0x3f0_0000);
        assert!(boot.is_ram(0x8000, 4096));
        assert!(!boot.is_ram(0x9f000, 4096), "crosses the end of low RAM");
        assert_eq!(
            boot.largest_free_ram(0x20_0000),
            Some((0x20_0000, 0x3e0_0000))
        );
        // A floor above every region (the bug the dev build caught).
        assert_eq!(boot.largest_free_ram(0x5000_0000), None);
    }

    #[test]
    fn rejects_hostile_start_info() {
        let mut mem = machine();
        mem.put(INFO, &0xdead_beefu32.to_le_bytes());
        assert!(matches!(
            BootInfo::read(&mem, INFO),
            Err(BootInfoError::BadMagic {
                magic: 0xdead_beef,
                ..
            })
        ));

        assert!(matches!(
            BootInfo::read(&machine(), 0xfff0),
            Err(BootInfoError::Unreadable { .. })
        ));

        let mut mem = machine();
        start_info(&mut mem, 0, 3);
        assert_eq!(
            BootInfo::read(&mem, INFO).err(),
            Some(BootInfoError::NoMemoryMap { version: 0 })
        );

        let mut mem = machine();
        start_info(&mut mem, 1, 1_000_000);
        assert_eq!(
            BootInfo::read(&mem, INFO).err(),
            Some(BootInfoError::TooManyRegions { entries: 1_000_000 })
        );
    }

    #[test]
    fn rejects_unterminated_or_binary_cmdlines() {
        let mut mem = machine();
        mem.put(CMDLINE, &[b'x'; MAX_CMDLINE + 1]);
        assert_eq!(
            BootInfo::read(&mem, INFO).err(),
            Some(BootInfoError::CmdlineTooLong)
        );

        let mut mem = TestMem::new(0x2004);
        start_info(&mut mem, 1, 0);
        mem.put(CMDLINE, b"abcd"); // runs off the end of memory
        assert!(matches!(
            BootInfo::read(&mem, INFO),
            Err(BootInfoError::Unreadable {
                what: "command line",
                ..
            })
        ));

        let mut mem = machine();
        mem.put(CMDLINE, b"probe=\xff\0");
        let boot = BootInfo::read(&mem, INFO).unwrap();
        assert_eq!(boot.cmdline(), Err(BootInfoError::CmdlineNotUtf8));
    }
}
