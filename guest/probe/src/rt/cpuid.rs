//! CPUID, which ring 3 may execute. On PVM hosts (kvm_pvm, as on this
//! project's machines) CPUID in guest ring 3 is not intercepted and shows
//! the host's CPU, so the probe never takes CPU identity (APIC IDs) from it;
//! it only reads leaves that describe the TSC, which the host shares.

use core::arch::x86_64::__cpuid_count;

pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    cpuid_sub(leaf, 0)
}

pub fn cpuid_sub(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = __cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// The highest leaf of the range starting at `base` (0 or 0x40000000, ...).
pub fn max_leaf(base: u32) -> u32 {
    cpuid(base).0
}
