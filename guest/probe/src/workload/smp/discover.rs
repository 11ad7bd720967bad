//! Which CPUs the machine has: the local APIC entries of the ACPI MADT
//! (found through hvm_start_info.rsdp_paddr, else by scanning the BIOS
//! areas for the RSDP), else the processor entries of an Intel MP table.
//! Every table is checksummed and bounds-checked: the VMM under test is
//! exactly what might get them wrong.

use core::fmt;

use crate::boot::MAX_CPUS;
use crate::rt::bootinfo::MAPPED_LIMIT;

pub const DEFAULT_LAPIC_BASE: u64 = 0xfee0_0000;
/// A table longer than this is taken as corrupt.
const MAX_TABLE_LEN: u32 = 1 << 20;

#[derive(Debug)]
pub enum DiscoverError {
    Unmapped {
        table: &'static str,
        paddr: u64,
    },
    BadChecksum {
        table: &'static str,
        paddr: u64,
    },
    BadLength {
        table: &'static str,
        paddr: u64,
        len: u32,
    },
    BadEntry {
        table: &'static str,
        offset: u32,
    },
    TooManyCpus,
    NoTables,
}

impl fmt::Display for DiscoverError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Unmapped { table, paddr } => {
                write!(f, "{table} at {paddr:#x} lies outside the mapped 4 GiB")
            }
            Self::BadChecksum { table, paddr } => {
                write!(f, "{table} at {paddr:#x} has a bad checksum")
            }
            Self::BadLength { table, paddr, len } => {
                write!(f, "{table} at {paddr:#x} has a bad length {len}")
            }
            Self::BadEntry { table, offset } => {
                write!(f, "{table}: malformed entry at offset {offset}")
            }
            Self::TooManyCpus => write!(f, "more than {MAX_CPUS} enabled CPUs (the probe's limit)"),
            Self::NoTables => write!(f, "no ACPI MADT and no MP table: cannot find the CPUs"),
        }
    }
}

#[derive(Clone, Copy)]
pub enum Source {
    Madt,
    MpTable,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Self::Madt => "madt",
            Self::MpTable => "mptable",
        })
    }
}

pub struct Cpus {
    apic_ids: [u32; MAX_CPUS],
    count: usize,
    pub lapic_base: u64,
    pub source: Source,
}

impl Cpus {
    fn new(source: Source) -> Self {
        Cpus {
            apic_ids: [0; MAX_CPUS],
            count: 0,
            lapic_base: DEFAULT_LAPIC_BASE,
            source,
        }
    }

    fn push(&mut self, apic_id: u32) -> Result<(), DiscoverError> {
        if self.apic_ids[..self.count].contains(&apic_id) {
            return Ok(());
        }
        *self
            .apic_ids
            .get_mut(self.count)
            .ok_or(DiscoverError::TooManyCpus)? = apic_id;
        self.count += 1;
        Ok(())
    }

    pub fn apic_ids(&self) -> &[u32] {
        &self.apic_ids[..self.count]
    }
}

/// A table in guest-physical memory, checked to lie below 4 GiB.
struct Phys {
    paddr: u64,
    len: u32,
}

impl Phys {
    fn new(table: &'static str, paddr: u64, len: u32) -> Result<Self, DiscoverError> {
        if paddr == 0 || paddr.saturating_add(u64::from(len)) > MAPPED_LIMIT {
            return Err(DiscoverError::Unmapped { table, paddr });
        }
        Ok(Phys { paddr, len })
    }

    fn bytes(&self) -> &'static [u8] {
        // SAFETY: `new` checked the range lies below 4 GiB, all identity
        // mapped; firmware tables are only read.
        unsafe { core::slice::from_raw_parts(self.paddr as *const u8, self.len as usize) }
    }

    fn u8(&self, off: u32) -> u8 {
        self.bytes().get(off as usize).copied().unwrap_or(0)
    }

    fn u16(&self, off: u32) -> u16 {
        u16::from_le_bytes([self.u8(off), self.u8(off + 1)])
    }

    fn u32(&self, off: u32) -> u32 {
        u32::from_le_bytes([
            self.u8(off),
            self.u8(off + 1),
            self.u8(off + 2),
            self.u8(off + 3),
        ])
    }

    fn u64(&self, off: u32) -> u64 {
        u64::from(self.u32(off)) | u64::from(self.u32(off + 4)) << 32
    }

    fn checksum_ok(&self) -> bool {
        self.bytes().iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    fn checked(self, table: &'static str) -> Result<Self, DiscoverError> {
        if self.checksum_ok() {
            Ok(self)
        } else {
            Err(DiscoverError::BadChecksum {
                table,
                paddr: self.paddr,
            })
        }
    }
}

/// The CPUs, from the MADT when there is an ACPI RSDP, else the MP table.
pub fn discover(rsdp_paddr: u64) -> Result<Cpus, DiscoverError> {
    let rsdp = if rsdp_paddr != 0 {
        Some(rsdp_paddr)
    } else {
        scan_bios_areas(b"RSD PTR ", 20)
    };
    if let Some(rsdp) = rsdp {
        if let Some(cpus) = from_acpi(rsdp)? {
            return Ok(cpus);
        }
    }
    match scan_bios_areas(b"_MP_", 16) {
        Some(floating) => from_mp_table(floating),
        None => Err(DiscoverError::NoTables),
    }
}

/// Searches the first KiB of the EBDA, the last KiB of base memory and the
/// BIOS ROM (0xE0000-0xFFFFF) for `signature` on a 16-byte boundary with a
/// valid checksum over `len` bytes.
fn scan_bios_areas(signature: &[u8], len: u32) -> Option<u64> {
    let bda = Phys {
        paddr: 0x400,
        len: 0x100,
    };
    let ebda = u64::from(bda.u16(0x0e)) << 4;
    let base_kib = u64::from(bda.u16(0x13));
    let areas = [
        (ebda, 1024),
        (base_kib.saturating_sub(1) * 1024, 1024),
        (0xe0000, 0x20000),
    ];
    areas
        .into_iter()
        .filter(|&(start, _)| (0x400..0x10_0000).contains(&start))
        .find_map(|(start, size)| {
            (start..start + size).step_by(16).find(|&paddr| {
                let candidate = Phys { paddr, len };
                candidate.bytes().starts_with(signature) && candidate.checksum_ok()
            })
        })
}

/// `Ok(None)` when the ACPI tables hold no MADT.
fn from_acpi(rsdp_paddr: u64) -> Result<Option<Cpus>, DiscoverError> {
    let rsdp = Phys::new("RSDP", rsdp_paddr, 20)?.checked("RSDP")?;
    let revision = rsdp.u8(15);
    let (root_paddr, entry_size) = if revision >= 2 {
        let rsdp2 = Phys::new("RSDP", rsdp_paddr, 36)?;
        match rsdp2.u64(24) {
            0 => (u64::from(rsdp.u32(16)), 4),
            xsdt => (xsdt, 8),
        }
    } else {
        (u64::from(rsdp.u32(16)), 4)
    };
    let root = sdt(if entry_size == 8 { "XSDT" } else { "RSDT" }, root_paddr)?;
    let mut offset = 36;
    while offset + entry_size <= root.len {
        let paddr = if entry_size == 8 {
            root.u64(offset)
        } else {
            u64::from(root.u32(offset))
        };
        offset += entry_size;
        let header = Phys::new("ACPI table", paddr, 36)?;
        if header.bytes().starts_with(b"APIC") {
            return parse_madt(&sdt("MADT", paddr)?).map(Some);
        }
    }
    Ok(None)
}

/// An ACPI system description table: header length checked, checksummed.
fn sdt(table: &'static str, paddr: u64) -> Result<Phys, DiscoverError> {
    let len = Phys::new(table, paddr, 36)?.u32(4);
    if !(36..=MAX_TABLE_LEN).contains(&len) {
        return Err(DiscoverError::BadLength { table, paddr, len });
    }
    Phys::new(table, paddr, len)?.checked(table)
}

fn parse_madt(madt: &Phys) -> Result<Cpus, DiscoverError> {
    const LOCAL_APIC: u8 = 0;
    const LAPIC_ADDRESS_OVERRIDE: u8 = 5;
    const LOCAL_X2APIC: u8 = 9;
    const ENABLED: u32 = 1;
    const ONLINE_CAPABLE: u32 = 2;
    let mut cpus = Cpus::new(Source::Madt);
    cpus.lapic_base = u64::from(madt.u32(36));
    let mut offset = 44;
    while offset + 2 <= madt.len {
        let (kind, len) = (madt.u8(offset), u32::from(madt.u8(offset + 1)));
        if len < 2 || offset + len > madt.len {
            return Err(DiscoverError::BadEntry {
                table: "MADT",
                offset,
            });
        }
        match kind {
            LOCAL_APIC if len >= 8 && madt.u32(offset + 4) & (ENABLED | ONLINE_CAPABLE) != 0 => {
                cpus.push(u32::from(madt.u8(offset + 3)))?;
            }
            LOCAL_X2APIC if len >= 16 && madt.u32(offset + 8) & (ENABLED | ONLINE_CAPABLE) != 0 => {
                cpus.push(madt.u32(offset + 4))?;
            }
            LAPIC_ADDRESS_OVERRIDE if len >= 12 => cpus.lapic_base = madt.u64(offset + 4),
            LOCAL_APIC | LOCAL_X2APIC | LAPIC_ADDRESS_OVERRIDE if len < 8 => {
                return Err(DiscoverError::BadEntry {
                    table: "MADT",
                    offset,
                });
            }
            _ => {}
        }
        offset += len;
    }
    Ok(cpus)
}

fn from_mp_table(floating_paddr: u64) -> Result<Cpus, DiscoverError> {
    const PROCESSOR: u8 = 0;
    const PROCESSOR_LEN: u32 = 20;
    const OTHER_LEN: u32 = 8;
    const ENABLED: u8 = 1;
    let floating = Phys::new("MP floating pointer", floating_paddr, 16)?;
    let config_paddr = u64::from(floating.u32(4));
    let len = u32::from(Phys::new("MP config table", config_paddr, 44)?.u16(4));
    if len < 44 {
        return Err(DiscoverError::BadLength {
            table: "MP config table",
            paddr: config_paddr,
            len,
        });
    }
    let config = Phys::new("MP config table", config_paddr, len)?.checked("MP config table")?;
    let mut cpus = Cpus::new(Source::MpTable);
    cpus.lapic_base = u64::from(config.u32(36));
    let mut offset = 44;
    for _ in 0..config.u16(34) {
        let kind = config.u8(offset);
        let entry_len = if kind == PROCESSOR {
            PROCESSOR_LEN
        } else {
            OTHER_LEN
        };
        if offset + entry_len > len {
            return Err(DiscoverError::BadEntry {
                table: "MP config table",
                offset,
            });
        }
        if kind == PROCESSOR && config.u8(offset + 3) & ENABLED != 0 {
            cpus.push(u32::from(config.u8(offset + 1)))?;
        }
        offset += entry_len;
    }
    Ok(cpus)
}
