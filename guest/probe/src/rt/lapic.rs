//! The local APIC in xAPIC mode, through its MMIO page (identity mapped for
//! ring 3). The APIC ID comes from here rather than CPUID, which PVM hosts
//! do not virtualise in ring 3.

use core::fmt;

use super::io::{mmio_read32, mmio_write32};
use super::tsc::Tsc;

/// The architectural reset address of the xAPIC page.
pub const DEFAULT_BASE: u64 = 0xfee0_0000;
const ID: u64 = 0x20;
const SVR: u64 = 0xf0;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const ICR_INIT: u32 = 0x0000_4500;
const ICR_STARTUP: u32 = 0x0000_4600;
const ICR_PENDING: u32 = 1 << 12;
const SVR_ENABLE: u32 = 0x100;
const SPURIOUS_VECTOR: u32 = 0xff;

#[derive(Debug)]
pub struct IpiStuck {
    apic_id: u32,
    command: u32,
}

impl fmt::Display for IpiStuck {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "IPI {:#x} to APIC ID {} stayed pending for 100 ms",
            self.command, self.apic_id
        )
    }
}

pub struct Lapic {
    base: u64,
}

impl Default for Lapic {
    fn default() -> Self {
        Lapic { base: DEFAULT_BASE }
    }
}

impl Lapic {
    pub fn new(base: u64) -> Self {
        Lapic { base }
    }

    fn read(&self, reg: u64) -> u32 {
        mmio_read32(self.base + reg)
    }

    fn write(&self, reg: u64, value: u32) {
        mmio_write32(self.base + reg, value);
    }

    /// This CPU's APIC ID.
    pub fn id(&self) -> u32 {
        self.read(ID) >> 24
    }

    /// Software-enables the APIC (reset leaves it disabled).
    pub fn enable(&self) {
        self.write(SVR, self.read(SVR) | SVR_ENABLE | SPURIOUS_VECTOR);
    }

    pub fn send_init(&self, clock: &Tsc, apic_id: u32) -> Result<(), IpiStuck> {
        self.send_ipi(clock, apic_id, ICR_INIT)
    }

    /// A start-up IPI: the AP begins in real mode at `vector << 12`.
    pub fn send_startup(&self, clock: &Tsc, apic_id: u32, vector: u8) -> Result<(), IpiStuck> {
        self.send_ipi(clock, apic_id, ICR_STARTUP | u32::from(vector))
    }

    fn send_ipi(&self, clock: &Tsc, apic_id: u32, command: u32) -> Result<(), IpiStuck> {
        self.write(ICR_HIGH, apic_id << 24);
        self.write(ICR_LOW, command);
        if clock.spin_until(0.1, || self.read(ICR_LOW) & ICR_PENDING == 0) {
            Ok(())
        } else {
            Err(IpiStuck { apic_id, command })
        }
    }
}
