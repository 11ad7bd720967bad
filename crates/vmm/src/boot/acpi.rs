//! ACPI tables (RSDP, XSDT, FADT, DSDT, MADT) in the reserved area at
//! 0xe0000, where Linux also scans for the RSDP. The platform is
//! hardware-reduced: no PM1 blocks or SCI, power-off through the sleep
//! control register, reset through the i8042.

use devices::legacy::{AcpiSleepControl, I8042, SLEEP_CONTROL_S5};
use devices::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::layout;

pub const RSDP_ADDR: u64 = layout::ACPI_START;
const OEM_ID: &[u8; 6] = b"OXVIRT";
const OEM_TABLE_ID: &[u8; 8] = b"OXVIRTVM";
const CREATOR_ID: &[u8; 4] = b"OXVT";
const SDT_HEADER_LEN: usize = 36;

/// Writes every table (they follow the RSDP, 16-byte aligned); returns
/// where the last one ends.
pub fn write(mem: &GuestMemory, vcpus: u32) -> Result<u64, GuestMemoryError> {
    let mut next = RSDP_ADDR + 64;
    let mut place = |table: Vec<u8>| -> Result<u64, GuestMemoryError> {
        let addr = next;
        mem.write_slice(&table, GuestAddress(addr))?;
        next = (addr + table.len() as u64 + 15) & !15;
        Ok(addr)
    };
    let dsdt = place(dsdt())?;
    let fadt = place(fadt(dsdt))?;
    let madt = place(madt(vcpus))?;
    let xsdt = place(xsdt(&[fadt, madt]))?;
    mem.write_slice(&rsdp(xsdt), GuestAddress(RSDP_ADDR))?;
    Ok(next)
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

/// A system description table: the 36-byte header, then `body`.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = (SDT_HEADER_LEN + body.len()) as u32;
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(signature);
    t.extend_from_slice(&len.to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+, XSDT
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt.to_le_bytes());
    r.push(0); // extended checksum
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

fn xsdt(tables: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = tables.iter().flat_map(|a| a.to_le_bytes()).collect();
    sdt(b"XSDT", 1, &body)
}

/// A generic address structure for a byte-wide I/O port.
fn io_port_gas(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = 8; // register width in bits
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn fadt(dsdt: u64) -> Vec<u8> {
    const LEN: usize = 276;
    const FLAG_WBINVD: u32 = 1 << 0;
    const FLAG_PWR_BUTTON: u32 = 1 << 4; // no fixed power button
    const FLAG_SLP_BUTTON: u32 = 1 << 5;
    const FLAG_RESET_REG_SUP: u32 = 1 << 10;
    const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;
    const BOOT_ARCH_8042: u16 = 1 << 1;
    const BOOT_ARCH_NO_VGA: u16 = 1 << 2;
    const BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
    const I8042_COMMAND: u16 = I8042::PORT + 4;
    const I8042_RESET: u8 = 0xfe;
    let mut b = vec![0u8; LEN - SDT_HEADER_LEN];
    let mut put = |offset: usize, bytes: &[u8]| {
        b[offset - SDT_HEADER_LEN..offset - SDT_HEADER_LEN + bytes.len()].copy_from_slice(bytes)
    };
    put(40, &(dsdt as u32).to_le_bytes());
    put(
        109,
        &(BOOT_ARCH_8042 | BOOT_ARCH_NO_VGA | BOOT_ARCH_NO_CMOS_RTC).to_le_bytes(),
    );
    let flags =
        FLAG_WBINVD | FLAG_PWR_BUTTON | FLAG_SLP_BUTTON | FLAG_RESET_REG_SUP | FLAG_HW_REDUCED_ACPI;
    put(112, &flags.to_le_bytes());
    put(116, &io_port_gas(I8042_COMMAND));
    put(128, &[I8042_RESET]);
    put(140, &dsdt.to_le_bytes());
    put(244, &io_port_gas(AcpiSleepControl::PORT));
    put(256, &io_port_gas(AcpiSleepControl::PORT + 1));
    put(268, b"OXVIRTVM");
    sdt(b"FACP", 6, &b)
}

/// The DSDT holds only `Name (_S5_, Package () { 5, 0 })`: the SLP_TYP
/// value Linux writes to the sleep control register to power off.
fn dsdt() -> Vec<u8> {
    const NAME_OP: u8 = 0x08;
    const PACKAGE_OP: u8 = 0x12;
    const BYTE_PREFIX: u8 = 0x0a;
    const ZERO_OP: u8 = 0x00;
    let slp_typ = (SLEEP_CONTROL_S5 >> 2) & 0x7;
    let aml = [
        NAME_OP,
        b'_',
        b'S',
        b'5',
        b'_',
        PACKAGE_OP,
        5, // PkgLength: itself + 4 bytes
        2,
        BYTE_PREFIX,
        slp_typ,
        ZERO_OP,
    ];
    sdt(b"DSDT", 2, &aml)
}

fn madt(vcpus: u32) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    const TYPE_LOCAL_APIC: u8 = 0;
    const TYPE_IO_APIC: u8 = 1;
    const LAPIC_ENABLED: u32 = 1;
    let mut b = Vec::new();
    b.extend_from_slice(&(layout::LAPIC_ADDR as u32).to_le_bytes());
    b.extend_from_slice(&PCAT_COMPAT.to_le_bytes());
    for id in 0..vcpus {
        b.extend_from_slice(&[TYPE_LOCAL_APIC, 8, id as u8, id as u8]);
        b.extend_from_slice(&LAPIC_ENABLED.to_le_bytes());
    }
    b.extend_from_slice(&[TYPE_IO_APIC, 12, vcpus as u8, 0]);
    b.extend_from_slice(&(layout::IOAPIC_ADDR as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    sdt(b"APIC", 5, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_checksum_and_lengths() {
        let f = fadt(0xe0040);
        assert_eq!(f.len(), 276);
        assert!(sums_to_zero(&f));
        let m = madt(3);
        assert_eq!(
            u32::from_le_bytes(m[4..8].try_into().unwrap()) as usize,
            m.len()
        );
        assert!(sums_to_zero(&m));
        assert_eq!(m.len(), 36 + 8 + 3 * 8 + 12);
        assert!(sums_to_zero(&dsdt()));
        let r = rsdp(0xe1000);
        assert!(sums_to_zero(&r[..20]) && sums_to_zero(&r));
    }

    #[test]
    fn madt_lists_every_vcpu() {
        let m = madt(4);
        let ids: Vec<u8> = m[44..44 + 4 * 8].chunks(8).map(|e| e[3]).collect();
        assert_eq!(ids, vec![0, 1, 2, 3]);
    }
}
