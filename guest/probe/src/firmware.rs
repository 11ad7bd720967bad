//! Which CPUs the machine has: the local APIC entries of the ACPI MADT
//! (found through hvm_start_info.rsdp_paddr, else by scanning the BIOS
//! areas for the RSDP), else the processor entries of an Intel MP table.
//! Every table is checksummed and bounds-checked: the VMM under test is
//! exactly what might get them wrong.

use core::fmt;

use crate::{le, PhysMem, MAX_CPUS};

pub const DEFAULT_LAPIC_BASE: u64 = 0xfee0_0000;
/// A table longer than this is taken as corrupt.
const MAX_TABLE_LEN: u32 = 1 << 20;
const SDT_HEADER_LEN: u32 = 36;
const MP_CONFIG_HEADER_LEN: u32 = 44;

#[derive(Debug, PartialEq)]
pub enum FirmwareError {
    Unreadable {
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

impl fmt::Display for FirmwareError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Unreadable { table, paddr } => {
                write!(
                    f,
                    "{table} at {paddr:#x} lies outside the memory the probe maps"
                )
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

#[derive(Clone, Copy, Debug, PartialEq)]
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

#[derive(Debug)]
pub struct Cpus {
    apic_ids: [u32; MAX_CPUS],
    count: usize,
    pub lapic_base: u64,
    pub source: Source,
}

impl Cpus {
    fn new(source: Source, lapic_base: u64) -> Self {
        Cpus {
            apic_ids: [0; MAX_CPUS],
            count: 0,
            lapic_base,
            source,
        }
    }

    fn push(&mut self, apic_id: u32) -> Result<(), FirmwareError> {
        if self.apic_ids().contains(&apic_id) {
            return Ok(());
        }
        *self
            .apic_ids
            .get_mut(self.count)
            .ok_or(FirmwareError::TooManyCpus)? = apic_id;
        self.count += 1;
        Ok(())
    }

    pub fn apic_ids(&self) -> &[u32] {
        &self.apic_ids[..self.count]
    }
}

/// A table read from guest memory, with its address for error messages.
struct Table<'m> {
    name: &'static str,
    paddr: u64,
    bytes: &'m [u8],
}

impl<'m> Table<'m> {
    fn read(
        mem: &'m impl PhysMem,
        name: &'static str,
        paddr: u64,
        len: u32,
    ) -> Result<Self, FirmwareError> {
        match mem.bytes(paddr, u64::from(len)) {
            Some(bytes) if paddr != 0 => Ok(Table { name, paddr, bytes }),
            _ => Err(FirmwareError::Unreadable { table: name, paddr }),
        }
    }

    fn len(&self) -> u32 {
        self.bytes.len() as u32
    }

    fn u8(&self, off: u32) -> u8 {
        le(self.bytes, off as usize, 1) as u8
    }

    fn u16(&self, off: u32) -> u16 {
        le(self.bytes, off as usize, 2) as u16
    }

    fn u32(&self, off: u32) -> u32 {
        le(self.bytes, off as usize, 4) as u32
    }

    fn u64(&self, off: u32) -> u64 {
        le(self.bytes, off as usize, 8)
    }

    fn checked(self) -> Result<Self, FirmwareError> {
        if checksum_ok(self.bytes) {
            Ok(self)
        } else {
            Err(FirmwareError::BadChecksum {
                table: self.name,
                paddr: self.paddr,
            })
        }
    }

    fn bad_entry(&self, offset: u32) -> FirmwareError {
        FirmwareError::BadEntry {
            table: self.name,
            offset,
        }
    }
}

fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
}

/// The CPUs, from the MADT when there is an ACPI RSDP with one, else from
/// the MP table.
pub fn discover(mem: &impl PhysMem, rsdp_paddr: u64) -> Result<Cpus, FirmwareError> {
    let rsdp = if rsdp_paddr != 0 {
        Some(rsdp_paddr)
    } else {
        scan_bios_areas(mem, b"RSD PTR ", 20)
    };
    if let Some(rsdp) = rsdp {
        if let Some(cpus) = from_acpi(mem, rsdp)? {
            return Ok(cpus);
        }
    }
    match scan_bios_areas(mem, b"_MP_", 16) {
        Some(floating) => from_mp_table(mem, floating),
        None => Err(FirmwareError::NoTables),
    }
}

/// Searches the first KiB of the EBDA, the last KiB of base memory and the
/// BIOS area 0xE0000-0xFFFFF for `signature` on a 16-byte boundary with a
/// valid checksum over `len` bytes.
fn scan_bios_areas(mem: &impl PhysMem, signature: &[u8], len: u64) -> Option<u64> {
    let bda = mem.bytes(0x400, 0x20)?;
    let ebda = le(bda, 0x0e, 2) << 4;
    let base_kib = le(bda, 0x13, 2);
    let areas = [
        (ebda, 1024),
        (base_kib.saturating_sub(1) * 1024, 1024),
        (0xe0000, 0x20000),
    ];
    areas
        .into_iter()
        .filter(|&(start, _)| (0x500..0x10_0000).contains(&start))
        .find_map(|(start, size)| {
            (start..start + size).step_by(16).find(|&paddr| {
                mem.bytes(paddr, len)
                    .is_some_and(|b| b.starts_with(signature) && checksum_ok(b))
            })
        })
}

/// `Ok(None)` when the ACPI tables hold no MADT.
fn from_acpi(mem: &impl PhysMem, rsdp_paddr: u64) -> Result<Option<Cpus>, FirmwareError> {
    let rsdp = Table::read(mem, "RSDP", rsdp_paddr, 20)?.checked()?;
    let xsdt = if rsdp.u8(15) >= 2 {
        Table::read(mem, "RSDP", rsdp_paddr, 36)?.u64(24)
    } else {
        0
    };
    let (root, entry_size) = match xsdt {
        0 => (sdt(mem, "RSDT", u64::from(rsdp.u32(16)))?, 4),
        xsdt => (sdt(mem, "XSDT", xsdt)?, 8),
    };
    let mut offset = SDT_HEADER_LEN;
    while offset + entry_size <= root.len() {
        let paddr = if entry_size == 8 {
            root.u64(offset)
        } else {
            u64::from(root.u32(offset))
        };
        offset += entry_size;
        if Table::read(mem, "ACPI table", paddr, SDT_HEADER_LEN)?
            .bytes
            .starts_with(b"APIC")
        {
            return parse_madt(&sdt(mem, "MADT", paddr)?).map(Some);
        }
    }
    Ok(None)
}

/// An ACPI system description table: length checked, checksummed.
fn sdt<'m>(
    mem: &'m impl PhysMem,
    name: &'static str,
    paddr: u64,
) -> Result<Table<'m>, FirmwareError> {
    let len = Table::read(mem, name, paddr, SDT_HEADER_LEN)?.u32(4);
    if !(SDT_HEADER_LEN..=MAX_TABLE_LEN).contains(&len) {
        return Err(FirmwareError::BadLength {
            table: name,
            paddr,
            len,
        });
    }
    Table::read(mem, name, paddr, len)?.checked()
}

fn parse_madt(madt: &Table) -> Result<Cpus, FirmwareError> {
    const LOCAL_APIC: u8 = 0;
    const LAPIC_ADDRESS_OVERRIDE: u8 = 5;
    const LOCAL_X2APIC: u8 = 9;
    const USABLE: u32 = 0b11; // enabled, or online-capable
    let mut cpus = Cpus::new(Source::Madt, u64::from(madt.u32(36)));
    let mut offset = 44;
    while offset < madt.len() {
        let (kind, len) = (madt.u8(offset), u32::from(madt.u8(offset + 1)));
        let min_len = match kind {
            LOCAL_APIC => 8,
            LAPIC_ADDRESS_OVERRIDE => 12,
            LOCAL_X2APIC => 16,
            _ => 2,
        };
        if len < min_len || offset + len > madt.len() {
            return Err(madt.bad_entry(offset));
        }
        match kind {
            LOCAL_APIC if madt.u32(offset + 4) & USABLE != 0 => {
                cpus.push(u32::from(madt.u8(offset + 3)))?
            }
            LOCAL_X2APIC if madt.u32(offset + 8) & USABLE != 0 => {
                cpus.push(madt.u32(offset + 4))?
            }
            LAPIC_ADDRESS_OVERRIDE => cpus.lapic_base = madt.u64(offset + 4),
            _ => {}
        }
        offset += len;
    }
    Ok(cpus)
}

fn from_mp_table(mem: &impl PhysMem, floating_paddr: u64) -> Result<Cpus, FirmwareError> {
    const PROCESSOR: u8 = 0;
    const PROCESSOR_LEN: u32 = 20;
    const OTHER_LEN: u32 = 8;
    const ENABLED: u8 = 1;
    let floating = Table::read(mem, "MP floating pointer", floating_paddr, 16)?;
    let paddr = u64::from(floating.u32(4));
    let len = u32::from(Table::read(mem, "MP config table", paddr, MP_CONFIG_HEADER_LEN)?.u16(4));
    if len < MP_CONFIG_HEADER_LEN {
        return Err(FirmwareError::BadLength {
            table: "MP config table",
            paddr,
            len,
        });
    }
    let config = Table::read(mem, "MP config table", paddr, len)?.checked()?;
    let mut cpus = Cpus::new(Source::MpTable, u64::from(config.u32(36)));
    let mut offset = MP_CONFIG_HEADER_LEN;
    for _ in 0..config.u16(34) {
        let kind = config.u8(offset);
        let entry_len = if kind == PROCESSOR {
            PROCESSOR_LEN
        } else {
            OTHER_LEN
        };
        if offset + entry_len > len {
            return Err(config.bad_entry(offset));
        }
        if kind == PROCESSOR && config.u8(offset + 3) & ENABLED != 0 {
            cpus.push(u32::from(config.u8(offset + 1)))?;
        }
        offset += entry_len;
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmem::TestMem;

    fn with_checksum(mut table: Vec<u8>, at: usize) -> Vec<u8> {
        table[at] = 0;
        let sum = table.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        table[at] = sum.wrapping_neg();
        table
    }

    fn sdt_bytes(signature: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut table = signature.to_vec();
        table.extend((SDT_HEADER_LEN + body.len() as u32).to_le_bytes());
        table.extend([1, 0]); // revision, checksum
        table.extend([0; 26]); // OEM and creator fields
        table.extend(body);
        with_checksum(table, 9)
    }

    fn rsdp_bytes(rsdt: u32) -> Vec<u8> {
        let mut rsdp = b"RSD PTR ".to_vec();
        rsdp.extend([0]); // checksum
        rsdp.extend(*b"OXVIRT");
        rsdp.extend([0]); // revision 0: RSDT only
        rsdp.extend(rsdt.to_le_bytes());
        with_checksum(rsdp, 8)
    }

    fn lapic(apic_id: u8, flags: u32) -> Vec<u8> {
        let mut entry = vec![0, 8, apic_id, apic_id];
        entry.extend(flags.to_le_bytes());
        entry
    }

    fn madt_body(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut body = 0xfee0_0000u32.to_le_bytes().to_vec();
        body.extend(1u32.to_le_bytes()); // PC-AT compatible
        entries.iter().for_each(|e| body.extend(e));
        body
    }

    /// RSDP at 0xe0000, RSDT at 0x1000, MADT at 0x2000.
    fn acpi_machine(entries: &[Vec<u8>]) -> TestMem {
        let mut mem = TestMem::new(0x10_0000);
        mem.put(0xe0000, &rsdp_bytes(0x1000));
        mem.put(0x1000, &sdt_bytes(b"RSDT", &0x2000u32.to_le_bytes()));
        mem.put(0x2000, &sdt_bytes(b"APIC", &madt_body(entries)));
        mem
    }

    #[test]
    fn madt_lists_usable_cpus_only() {
        let mem = acpi_machine(&[lapic(0, 1), lapic(1, 1), lapic(2, 0), lapic(3, 2)]);
        let cpus = discover(&mem, 0xe0000).unwrap();
        assert_eq!(cpus.apic_ids(), [0, 1, 3]);
        assert_eq!(cpus.source, Source::Madt);
        assert_eq!(cpus.lapic_base, DEFAULT_LAPIC_BASE);
        // Without rsdp_paddr the RSDP is found by scanning 0xE0000-0xFFFFF.
        assert_eq!(discover(&mem, 0).unwrap().apic_ids(), [0, 1, 3]);
    }

    #[test]
    fn madt_x2apic_entries_and_address_override() {
        let mut x2apic = vec![9, 16, 0, 0];
        x2apic.extend(300u32.to_le_bytes());
        x2apic.extend(1u32.to_le_bytes());
        x2apic.extend(0u32.to_le_bytes());
        let mut override_entry = vec![5, 12, 0, 0];
        override_entry.extend(0xfed0_0000u64.to_le_bytes());
        let mem = acpi_machine(&[lapic(0, 1), x2apic, override_entry]);
        let cpus = discover(&mem, 0xe0000).unwrap();
        assert_eq!(cpus.apic_ids(), [0, 300]);
        assert_eq!(cpus.lapic_base, 0xfed0_0000);
    }

    #[test]
    fn hostile_acpi_tables_are_errors_not_hangs() {
        let mut mem = acpi_machine(&[lapic(0, 1)]);
        mem.0[0xe0000 + 9] ^= 0xff;
        assert!(matches!(
            discover(&mem, 0xe0000),
            Err(FirmwareError::BadChecksum { table: "RSDP", .. })
        ));

        // A zero-length entry would loop forever if taken at its word.
        let mem = acpi_machine(&[lapic(0, 1), vec![0x7f, 0]]);
        assert_eq!(
            discover(&mem, 0xe0000).unwrap_err(),
            FirmwareError::BadEntry {
                table: "MADT",
                offset: 52
            }
        );

        // An entry running past the end of the table.
        let mem = acpi_machine(&[vec![0, 40, 1, 1, 1, 0, 0, 0]]);
        assert_eq!(
            discover(&mem, 0xe0000).unwrap_err(),
            FirmwareError::BadEntry {
                table: "MADT",
                offset: 44
            }
        );

        // A local APIC entry too short to hold its flags.
        let mem = acpi_machine(&[vec![0, 4, 1, 1]]);
        assert!(matches!(
            discover(&mem, 0xe0000),
            Err(FirmwareError::BadEntry { .. })
        ));

        // The RSDT points outside guest memory.
        let mut mem = acpi_machine(&[lapic(0, 1)]);
        mem.put(0xe0000, &rsdp_bytes(0x7000_0000));
        assert!(matches!(
            discover(&mem, 0xe0000),
            Err(FirmwareError::Unreadable { table: "RSDT", .. })
        ));

        // An absurd table length.
        let mut mem = acpi_machine(&[lapic(0, 1)]);
        mem.put(0x1004, &u32::MAX.to_le_bytes());
        assert!(matches!(
            discover(&mem, 0xe0000),
            Err(FirmwareError::BadLength { table: "RSDT", .. })
        ));
    }

    #[test]
    fn more_cpus_than_the_probe_supports() {
        let entries: Vec<_> = (0..=MAX_CPUS as u8).map(|id| lapic(id, 1)).collect();
        let mem = acpi_machine(&entries);
        assert_eq!(
            discover(&mem, 0xe0000).unwrap_err(),
            FirmwareError::TooManyCpus
        );
    }

    /// An MP floating pointer at 0xf0000 and a config table at 0xf1000 with
    /// the given entries, listed `count` times in the header.
    fn mp_machine(entries: &[Vec<u8>], count: u16) -> TestMem {
        let mut mem = TestMem::new(0x10_0000);
        let mut floating = b"_MP_".to_vec();
        floating.extend(0xf1000u32.to_le_bytes());
        floating.extend([1, 4, 0, 0, 0, 0, 0, 0]);
        mem.put(0xf0000, &with_checksum(floating, 10));
        let body: Vec<u8> = entries.concat();
        let mut config = b"PCMP".to_vec();
        config.extend((44 + body.len() as u16).to_le_bytes());
        config.extend([4, 0]); // spec revision, checksum
        config.extend([0; 20]); // OEM and product ids
        config.extend(0u32.to_le_bytes()); // OEM table
        config.extend(0u16.to_le_bytes()); // OEM table size
        config.extend(count.to_le_bytes());
        config.extend(0xfee0_0000u32.to_le_bytes());
        config.extend(0u32.to_le_bytes()); // extended table
        config.extend(body);
        mem.put(0xf1000, &with_checksum(config, 7));
        mem
    }

    fn mp_cpu(apic_id: u8, flags: u8) -> Vec<u8> {
        let mut entry = vec![0, apic_id, 0x14, flags];
        entry.extend([0; 16]);
        entry
    }

    #[test]
    fn mp_table_when_there_is_no_acpi() {
        let bus = vec![1, 0, b'I', b'S', b'A', b' ', b' ', b' '];
        let entries = [mp_cpu(0, 3), mp_cpu(1, 1), mp_cpu(2, 0), bus, mp_cpu(5, 1)];
        let mem = mp_machine(&entries, 5);
        let cpus = discover(&mem, 0).unwrap();
        assert_eq!(cpus.apic_ids(), [0, 1, 5]);
        assert_eq!(cpus.source, Source::MpTable);
    }

    #[test]
    fn hostile_mp_tables() {
        // More entries announced than the table holds.
        let mem = mp_machine(&[mp_cpu(0, 3)], 40);
        assert_eq!(
            discover(&mem, 0).unwrap_err(),
            FirmwareError::BadEntry {
                table: "MP config table",
                offset: 64
            }
        );
        let mut mem = mp_machine(&[mp_cpu(0, 3)], 1);
        mem.0[0xf1000 + 50] ^= 1;
        assert!(matches!(
            discover(&mem, 0),
            Err(FirmwareError::BadChecksum { .. })
        ));
        assert_eq!(
            discover(&TestMem::new(0x10_0000), 0).unwrap_err(),
            FirmwareError::NoTables
        );
    }
}
