//! `smp`: every vCPU reports in. The boot CPU finds the CPUs in the MADT or
//! MP table (`oxvirt_probe::firmware`), copies the real-mode trampoline below 1 MiB and
//! starts each AP with INIT-SIPI-SIPI through its xAPIC (MMIO, which the
//! identity map gives ring 3). An AP runs the same long-mode path as the
//! boot CPU, enters ring 3, prints `PROBE RESULT smp cpu=<apic id>` and
//! parks; the boot CPU then prints the total.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use super::Workload;
use crate::boot::{self, AP_BOOT_INDEX};
use crate::rt::fail::Fail;
use crate::rt::io::pause;
use crate::rt::lapic::Lapic;
use crate::rt::physmem::IdentityMap;
use crate::rt::tsc::Tsc;
use crate::{fail, say};
use oxvirt_probe::bootinfo::BootInfo;
use oxvirt_probe::firmware;
use oxvirt_probe::params::Params;

pub const WORKLOAD: Workload = Workload {
    name: "smp",
    keys: &["timeout_ms"],
    run,
};

/// Where the trampoline goes: conventional memory, page aligned, SIPI vector 8.
const TRAMPOLINE_PADDR: u64 = 0x8000;

/// The index of the last AP that reached ring 3.
static AP_STARTED: AtomicU32 = AtomicU32::new(0);
/// How many APs printed their line.
static AP_REPORTED: AtomicUsize = AtomicUsize::new(0);

fn run(boot: &BootInfo, params: &Params) -> Result<(), Fail> {
    let timeout = params.u64("timeout_ms", 2000, 1, 600_000)? as f64 / 1000.0;
    let clock = Tsc::detect()?;
    let bsp = Lapic::default().id();
    say!("PROBE RESULT smp cpu={bsp}");
    let cpus = firmware::discover(&IdentityMap, boot.rsdp_paddr)?;
    let aps = cpus.apic_ids().iter().copied().filter(|&id| id != bsp);
    if aps.clone().count() > 0 {
        install_trampoline(boot)?;
        let lapic = Lapic::new(cpus.lapic_base);
        lapic.enable();
        for (index, ap) in (1..).zip(aps.clone()) {
            start_ap(&lapic, &clock, ap, index, timeout)?;
        }
    }
    let expected = aps.count();
    if !clock.spin_until(timeout, || AP_REPORTED.load(Ordering::Acquire) == expected) {
        return fail!(
            "smp: {} of {expected} APs reported in within {timeout} s",
            AP_REPORTED.load(Ordering::Acquire)
        );
    }
    say!(
        "PROBE RESULT smp cpus={} source={} lapic={:#x}",
        expected + 1,
        cpus.source,
        cpus.lapic_base
    );
    Ok(())
}

/// Ring-3 entry of AP number `index` (1, 2, ... in start order).
pub fn ap_main(index: usize) -> ! {
    AP_STARTED.store(index as u32, Ordering::Release);
    // The xAPIC sits at its reset address; the boot CPU moved none.
    say!("PROBE RESULT smp cpu={}", Lapic::default().id());
    AP_REPORTED.fetch_add(1, Ordering::AcqRel);
    // Ring 3 cannot halt: park in a pause loop until the VM ends.
    loop {
        pause();
    }
}

fn install_trampoline(boot: &BootInfo) -> Result<(), Fail> {
    let code = boot::ap_trampoline();
    if !boot.is_ram(TRAMPOLINE_PADDR, 4096) {
        return fail!(
            "smp: the AP trampoline page {TRAMPOLINE_PADDR:#x} is not RAM in the memory map"
        );
    }
    // SAFETY: the page is RAM below 1 MiB (checked above), identity mapped,
    // used by nothing else once the boot information has been copied out.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), TRAMPOLINE_PADDR as *mut u8, code.len())
    };
    Ok(())
}

/// The MP specification's sequence: INIT, 10 ms, SIPI, 200 us, SIPI; then
/// wait for AP number `index` to reach ring 3.
fn start_ap(
    lapic: &Lapic,
    clock: &Tsc,
    apic_id: u32,
    index: u32,
    timeout: f64,
) -> Result<(), Fail> {
    if apic_id > 0xff {
        return fail!("smp: APIC ID {apic_id} needs x2APIC, the probe drives the xAPIC");
    }
    let vector = (TRAMPOLINE_PADDR >> 12) as u8;
    AP_BOOT_INDEX.store(index, Ordering::Release);
    lapic.send_init(clock, apic_id)?;
    clock.spin_for(0.01);
    let started = || AP_STARTED.load(Ordering::Acquire) == index;
    for _ in 0..2 {
        lapic.send_startup(clock, apic_id, vector)?;
        if clock.spin_until(0.0002, started) {
            return Ok(());
        }
    }
    if !clock.spin_until(timeout, started) {
        return fail!(
            "smp: CPU with APIC ID {apic_id} did not start within {timeout} s of its SIPI"
        );
    }
    Ok(())
}
