//! Time from the TSC. Its frequency comes from the hypervisor's word where
//! one is given (KVM's leaf 0x40000010, then CPUID 0x15), else from timing
//! the PIT (channel 0, read back through latch commands), else CPUID 0x16's nominal
//! MHz. The workloads report which source they used.

use core::arch::x86_64::_rdtsc;
use core::fmt;

use super::cpuid::{cpuid, max_leaf};
use super::io::{inb, outb, pause};

const PIT_HZ: u64 = 1_193_182;
const PIT_CALIBRATION_MS: u64 = 20;

pub fn now() -> u64 {
    // SAFETY: rdtsc is allowed in ring 3 (CR4.TSD is clear) and has no side effects.
    unsafe { _rdtsc() }
}

#[derive(Clone, Copy)]
pub enum TscSource {
    KvmLeaf,
    Cpuid15,
    Pit,
    Cpuid16,
}

impl fmt::Display for TscSource {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Self::KvmLeaf => "cpuid_40000010",
            Self::Cpuid15 => "cpuid_15",
            Self::Pit => "pit",
            Self::Cpuid16 => "cpuid_16",
        })
    }
}

#[derive(Debug)]
pub struct NoTscFrequency;

impl fmt::Display for NoTscFrequency {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "cannot tell the TSC frequency: no CPUID 0x40000010/0x15/0x16 value and no PIT at ports 0x40-0x43")
    }
}

#[derive(Clone, Copy)]
pub struct Tsc {
    pub khz: u64,
    pub source: TscSource,
}

impl Tsc {
    pub fn detect() -> Result<Self, NoTscFrequency> {
        if let Some(khz) = kvm_leaf_khz() {
            return Ok(Tsc {
                khz,
                source: TscSource::KvmLeaf,
            });
        }
        if let Some(khz) = cpuid15_khz() {
            return Ok(Tsc {
                khz,
                source: TscSource::Cpuid15,
            });
        }
        if let Some(khz) = pit_khz() {
            return Ok(Tsc {
                khz,
                source: TscSource::Pit,
            });
        }
        cpuid16_khz()
            .map(|khz| Tsc {
                khz,
                source: TscSource::Cpuid16,
            })
            .ok_or(NoTscFrequency)
    }

    pub fn seconds(&self, ticks: u64) -> f64 {
        ticks as f64 / (self.khz as f64 * 1000.0)
    }

    pub fn ticks(&self, seconds: f64) -> u64 {
        (seconds * self.khz as f64 * 1000.0) as u64
    }

    pub fn spin_for(&self, seconds: f64) {
        let until = now().wrapping_add(self.ticks(seconds));
        while (now().wrapping_sub(until) as i64) < 0 {
            pause();
        }
    }

    /// Spins until `done()` or `seconds` pass; says whether `done()` held.
    pub fn spin_until(&self, seconds: f64, mut done: impl FnMut() -> bool) -> bool {
        let start = now();
        let limit = self.ticks(seconds);
        while !done() {
            if now().wrapping_sub(start) > limit {
                return false;
            }
            pause();
        }
        true
    }
}

fn kvm_leaf_khz() -> Option<u64> {
    let (_, b, c, d) = cpuid(0x4000_0000);
    let signature = [b.to_le_bytes(), c.to_le_bytes(), d.to_le_bytes()];
    let known = matches!(
        signature.as_flattened(),
        b"KVMKVMKVM\0\0\0" | b"VMwareVMware"
    );
    if !known || max_leaf(0x4000_0000) < 0x4000_0010 {
        return None;
    }
    let khz = cpuid(0x4000_0010).0;
    (khz != 0).then_some(u64::from(khz))
}

fn cpuid15_khz() -> Option<u64> {
    if max_leaf(0) < 0x15 {
        return None;
    }
    let (denominator, numerator, crystal_hz, _) = cpuid(0x15);
    if denominator == 0 || numerator == 0 || crystal_hz == 0 {
        return None;
    }
    Some(u64::from(crystal_hz) * u64::from(numerator) / u64::from(denominator) / 1000)
}

fn cpuid16_khz() -> Option<u64> {
    if max_leaf(0) < 0x16 {
        return None;
    }
    let mhz = cpuid(0x16).0 & 0xffff;
    (mhz != 0).then_some(u64::from(mhz) * 1000)
}

/// Times PIT channel 0 counting down (mode 0, read back with latch
/// commands) against the TSC. Channel 0 needs no gate, so this works without
/// the port-0x61 speaker logic (QEMU microvm has none); interrupts are off,
/// so its IRQ 0 at terminal count is moot. Each PIT read is three VM exits
/// and the vCPU may be preempted, so every read is bracketed by two TSC
/// reads, the tightest of several is kept, and a window whose brackets are
/// loose (more than 0.1% of it) or that was preempted long enough for the
/// counter to wrap is repeated.
fn pit_khz() -> Option<u64> {
    const ATTEMPTS: u32 = 10;
    let mut best: Option<Window> = None;
    for _ in 0..ATTEMPTS {
        let Some(window) = pit_window()? else {
            continue;
        };
        let tight = window.slack * 1000 < window.ticks;
        if best.as_ref().is_none_or(|b| window.slack < b.slack) {
            best = Some(window);
        }
        if tight {
            break;
        }
    }
    best.map(|w| w.khz)
}

struct Window {
    khz: u64,
    ticks: u64,
    slack: u64,
}

/// One calibration window: `None` (outer) when there is no PIT, `Some(None)`
/// when the window was disturbed and must be repeated.
fn pit_window() -> Option<Option<Window>> {
    const STUCK_READS: u32 = 1000;
    // A larger step between two polls means a preemption that could hide a
    // wrap of the counter (65535 - wanted > MAX_STEP keeps that impossible).
    const MAX_STEP: u16 = 40_000;
    let wanted = (PIT_HZ * PIT_CALIBRATION_MS / 1000) as u16;
    outb(0x43, 0x30); // channel 0, lobyte/hibyte, mode 0, binary
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    let first = tightest_read();
    let mut previous = first.count;
    let mut reads = 0u32;
    loop {
        let last = pit_read();
        reads = reads.saturating_add(1);
        if last.count > previous || previous - last.count > MAX_STEP {
            return Some(None);
        }
        previous = last.count;
        let elapsed = first.count - last.count;
        if elapsed >= wanted {
            let last = if last.slack() > first.slack() {
                tightest_read()
            } else {
                last
            };
            let Some(elapsed) = first.count.checked_sub(last.count) else {
                return Some(None);
            };
            let ticks = last.mid().wrapping_sub(first.mid());
            let khz = ticks * PIT_HZ / (u64::from(elapsed) * 1000);
            return Some(Some(Window {
                khz,
                ticks,
                slack: (first.slack() + last.slack()) / 2,
            }));
        }
        // An absent PIT reads as a constant (0xffff); a real one moves.
        if elapsed == 0 && reads == STUCK_READS {
            return None;
        }
    }
}

struct PitRead {
    count: u16,
    before: u64,
    after: u64,
}

impl PitRead {
    fn mid(&self) -> u64 {
        self.before + (self.after - self.before) / 2
    }

    fn slack(&self) -> u64 {
        self.after - self.before
    }
}

fn pit_read() -> PitRead {
    let before = now();
    outb(0x43, 0x00); // latch channel 0
    let low = inb(0x40);
    let high = inb(0x40);
    PitRead {
        count: u16::from_le_bytes([low, high]),
        before,
        after: now(),
    }
}

/// The read with the smallest TSC bracket out of a few.
fn tightest_read() -> PitRead {
    (0..4)
        .map(|_| pit_read())
        .min_by_key(PitRead::slack)
        .unwrap_or_else(pit_read)
}
