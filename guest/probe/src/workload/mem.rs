//! `mem`: a dirty-memory workload in the style of QEMU's migration test.
//! It fills `probe.mib` MiB, then increments one byte in every 4 KiB page,
//! pass after pass, at most `probe.dirty_mib_s` MiB/s (TSC-paced), for
//! `probe.passes` passes (default: until the VM is stopped), one
//! `PROBE RESULT mem pass=N ...` line per pass.
//!
//! With `probe.verify=1` every page is checked as it is visited: it must
//! hold the previous pass's counter. So at any moment the pages hold equal
//! counters, or counters differing by one at a single boundary (the current
//! position); a page lost or left stale by a migration or snapshot fails.

use super::Workload;
use crate::rt::fail::Fail;
use crate::rt::tsc::{self, Tsc};
use crate::{fail, say};
use oxvirt_probe::bootinfo::BootInfo;
use oxvirt_probe::params::Params;

pub const WORKLOAD: Workload = Workload {
    name: "mem",
    keys: &["mib", "dirty_mib_s", "passes", "verify"],
    run,
};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;
/// Pages dirtied between two looks at the clock when the rate is capped.
const PACING_PAGES: usize = 64;

extern "C" {
    /// End of the probe's image (link.ld): free RAM starts above it.
    static __image_end: u8;
}

struct Settings {
    mib: u64,
    dirty_mib_s: Option<u64>,
    passes: Option<u64>,
    verify: bool,
}

fn run(boot: &BootInfo, params: &Params) -> Result<(), Fail> {
    let settings = Settings {
        mib: params.u64("mib", 64, 1, 4096)?,
        dirty_mib_s: params.opt_u64("dirty_mib_s", 1, 1 << 20)?,
        passes: params.opt_u64("passes", 1, u64::MAX)?,
        verify: params.flag("verify")?,
    };
    let clock = Tsc::detect()?;
    let region = claim_region(boot, settings.mib)?;

    let start = tsc::now();
    region.fill(0);
    let seconds = clock.seconds(tsc::now().wrapping_sub(start));
    say!(
        "PROBE RESULT mem fill_mib={} base={:#x} seconds={seconds:.6} mib_s={:.1} tsc_khz={} tsc_source={}",
        settings.mib,
        region.as_ptr() as u64,
        settings.mib as f64 / seconds,
        clock.khz,
        clock.source
    );

    let mut pass = 1;
    loop {
        let start = tsc::now();
        dirty_pass(region, &clock, &settings, pass)?;
        let seconds = clock.seconds(tsc::now().wrapping_sub(start));
        say!(
            "PROBE RESULT mem pass={pass} pages={} seconds={seconds:.6} dirty_mib_s={:.1} verify={}",
            region.len() / PAGE,
            (region.len() / MIB) as f64 / seconds,
            if settings.verify { "ok" } else { "off" }
        );
        if settings.passes == Some(pass) {
            return Ok(());
        }
        pass += 1;
    }
}

/// `mib` MiB of RAM above the probe's image, from the memory map.
fn claim_region(boot: &BootInfo, mib: u64) -> Result<&'static mut [u8], Fail> {
    let floor = core::ptr::addr_of!(__image_end) as u64;
    let (start, len) = boot.largest_free_ram(floor).unwrap_or((floor, 0));
    let want = mib * MIB as u64;
    if want > len {
        return fail!(
            "mem: probe.mib={mib} does not fit: the largest free RAM range has {} MiB",
            len >> 20
        );
    }
    // SAFETY: [start, start + want) is RAM per the memory map, above the
    // probe's image, below 4 GiB (identity mapped) and used by nothing else.
    Ok(unsafe { core::slice::from_raw_parts_mut(start as *mut u8, want as usize) })
}

/// Increments the first byte of every page once; the counter of pass N is N mod 256.
fn dirty_pass(region: &mut [u8], clock: &Tsc, settings: &Settings, pass: u64) -> Result<(), Fail> {
    let expected = (pass - 1) as u8;
    let bytes_per_s = settings.dirty_mib_s.map(|rate| rate as f64 * MIB as f64);
    let start = tsc::now();
    for (index, page) in region.chunks_exact_mut(PAGE).enumerate() {
        // Volatile: each pass must really write every page, not be folded.
        let counter = core::ptr::addr_of_mut!(page[0]);
        // SAFETY: `counter` points into this page of the claimed region.
        let old = unsafe { counter.read_volatile() };
        if settings.verify && old != expected {
            return fail!(
                "mem verify: pass {pass}: page {index} (address {:#x}) holds {old}, expected {expected}",
                counter as u64
            );
        }
        // SAFETY: as above.
        unsafe { counter.write_volatile(old.wrapping_add(1)) };
        if let Some(bytes_per_s) = bytes_per_s {
            if index % PACING_PAGES == PACING_PAGES - 1 {
                let due = clock.ticks(((index + 1) * PAGE) as f64 / bytes_per_s);
                while tsc::now().wrapping_sub(start) < due {
                    crate::rt::io::pause();
                }
            }
        }
    }
    Ok(())
}
