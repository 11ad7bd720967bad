//! The Intel MultiProcessor table (MP specification 1.4) in the BIOS area
//! at 0xf0000, next to the ACPI tables: a kernel booted without ACPI (Linux
//! `acpi=off`) finds every vCPU, the IOAPIC and the interrupt routing here.
//! The routing is the MADT's: ISA IRQ n on IOAPIC pin n, LINT0 ExtINT,
//! LINT1 NMI.

use devices::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::layout;

const FLOATING_SIGNATURE: &[u8; 4] = b"_MP_";
const TABLE_SIGNATURE: &[u8; 4] = b"PCMP";
const SPEC_REVISION: u8 = 4;
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const OEM_ID: &[u8; 8] = b"OXVIRT  ";
const PRODUCT_ID: &[u8; 12] = b"OXVIRTVM    ";

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// An integrated xAPIC and an 82093AA-style IOAPIC, as KVM emulates them.
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOTSTRAP: u8 = 1 << 1;
const IOAPIC_ENABLED: u8 = 1;
/// Processor entries carry a family-6 signature and the FPU and APIC
/// feature flags; Linux reads the real values from CPUID.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ISA_BUS_ID: u8 = 0;
const ISA_BUS_TYPE: &[u8; 6] = b"ISA   ";
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// Polarity and trigger as the bus defines them (ISA: edge, active high).
const FLAGS_CONFORM: u16 = 0;
const ALL_LAPICS: u8 = 0xff;

/// Writes the floating pointer and the configuration table behind it.
pub fn write(mem: &GuestMemory, vcpus: u32) -> Result<(), GuestMemoryError> {
    mem.write_slice(
        &image(vcpus, layout::MPTABLE_ADDR),
        GuestAddress(layout::MPTABLE_ADDR),
    )
}

/// The bytes of the floating pointer at `addr`, then the table.
fn image(vcpus: u32, addr: u64) -> Vec<u8> {
    let table = config_table(vcpus);
    let mut out = floating_pointer(addr + FLOATING_LEN as u64).to_vec();
    out.extend_from_slice(&table);
    out
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

fn floating_pointer(table_addr: u64) -> [u8; FLOATING_LEN] {
    let mut f = [0u8; FLOATING_LEN];
    f[..4].copy_from_slice(FLOATING_SIGNATURE);
    f[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    f[8] = 1; // length in 16-byte units
    f[9] = SPEC_REVISION;
    // f[11] (feature byte 1) = 0: a configuration table is present.
    f[10] = checksum(&f);
    f
}

fn config_table(vcpus: u32) -> Vec<u8> {
    let ioapic_id = vcpus as u8;
    let mut entries = Vec::new();
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id as u8, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(ISA_BUS_TYPE);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    entries.extend_from_slice(&(layout::IOAPIC_ADDR as u32).to_le_bytes());
    for pin in 0..layout::IOAPIC_PINS as u8 {
        entries.push(ENTRY_IO_INTERRUPT);
        entries.push(INT_VECTORED);
        entries.extend_from_slice(&FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, pin, ioapic_id, pin]);
    }
    for (kind, lint) in [(INT_EXTINT, 0), (INT_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LAPICS, lint]);
    }
    let count = vcpus as usize + 2 + layout::IOAPIC_PINS as usize + 2;
    let len = HEADER_LEN + entries.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(TABLE_SIGNATURE);
    t.extend_from_slice(&(len as u16).to_le_bytes());
    t.push(SPEC_REVISION);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(PRODUCT_ID);
    t.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    t.extend_from_slice(&0u16.to_le_bytes());
    t.extend_from_slice(&(count as u16).to_le_bytes());
    t.extend_from_slice(&(layout::LAPIC_ADDR as u32).to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // no extended entries
    t.extend_from_slice(&[0, 0]); // their checksum, reserved
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a kernel learns from the table: (BSP-first APIC IDs, IOAPIC
    /// id and address, IO interrupt routes (irq, pin), local interrupt kinds).
    #[derive(Debug, PartialEq)]
    struct Parsed {
        cpus: Vec<(u8, bool)>,
        ioapic: (u8, u32),
        routes: Vec<(u8, u8)>,
        lints: Vec<(u8, u8)>,
    }

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// Parses guest memory as Linux's mpparse.c does: scan the BIOS area
    /// for the floating pointer on a 16-byte boundary, check both
    /// checksums, then walk the entries.
    fn parse(mem: &GuestMemory) -> Parsed {
        let mut bios = vec![0u8; 0x10000];
        mem.read_slice(&mut bios, GuestAddress(0xf0000)).unwrap();
        let at = (0..bios.len())
            .step_by(16)
            .find(|&i| &bios[i..i + 4] == FLOATING_SIGNATURE)
            .expect("no _MP_ in 0xf0000-0xfffff");
        let fp = &bios[at..at + 16];
        assert!(sums_to_zero(fp));
        assert_eq!((fp[8], fp[9], fp[11]), (1, 4, 0));
        let table_addr = u64::from(u32_at(fp, 4));
        let mut header = [0u8; HEADER_LEN];
        mem.read_slice(&mut header, GuestAddress(table_addr))
            .unwrap();
        assert_eq!(&header[..4], TABLE_SIGNATURE);
        let len = u16::from_le_bytes([header[4], header[5]]) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(table_addr)).unwrap();
        assert!(sums_to_zero(&t), "table checksum");
        assert_eq!(u32_at(&t, 36), layout::LAPIC_ADDR as u32);
        let count = u16::from_le_bytes([t[34], t[35]]) as usize;
        let mut p = Parsed {
            cpus: vec![],
            ioapic: (0, 0),
            routes: vec![],
            lints: vec![],
        };
        let mut off = HEADER_LEN;
        for _ in 0..count {
            let e = &t[off..];
            off += match e[0] {
                ENTRY_PROCESSOR => {
                    assert_ne!(e[3] & CPU_ENABLED, 0);
                    p.cpus.push((e[1], e[3] & CPU_BOOTSTRAP != 0));
                    20
                }
                ENTRY_BUS => {
                    assert_eq!(&e[2..8], ISA_BUS_TYPE);
                    8
                }
                ENTRY_IOAPIC => {
                    p.ioapic = (e[1], u32_at(e, 4));
                    8
                }
                ENTRY_IO_INTERRUPT => {
                    assert_eq!(e[6], p.ioapic.0, "route to our IOAPIC");
                    p.routes.push((e[5], e[7]));
                    8
                }
                ENTRY_LOCAL_INTERRUPT => {
                    p.lints.push((e[1], e[7]));
                    8
                }
                other => panic!("unknown entry type {other} at {off}"),
            };
        }
        assert_eq!(off, len, "entries fill the table exactly");
        p
    }

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn linux_style_parse_finds_every_vcpu_and_the_ioapic() {
        let mem = memory();
        write(&mem, 3).unwrap();
        let p = parse(&mem);
        assert_eq!(p.cpus, vec![(0, true), (1, false), (2, false)]);
        assert_eq!(p.ioapic, (3, layout::IOAPIC_ADDR as u32));
        let identity: Vec<(u8, u8)> = (0..24).map(|i| (i, i)).collect();
        assert_eq!(p.routes, identity);
        assert_eq!(p.lints, vec![(INT_EXTINT, 0), (INT_NMI, 1)]);
    }

    #[test]
    fn the_largest_table_fits_beside_the_acpi_tables() {
        let mem = memory();
        let acpi_end = super::super::acpi::write(&mem, 254).unwrap();
        assert!(
            acpi_end <= layout::MPTABLE_ADDR,
            "ACPI ends at {acpi_end:#x}"
        );
        write(&mem, 254).unwrap();
        assert_eq!(parse(&mem).cpus.len(), 254);
        assert!(layout::MPTABLE_ADDR + image(254, 0).len() as u64 <= layout::ACPI_END);
    }
}
