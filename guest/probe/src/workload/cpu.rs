//! `cpu`: sysbench's cpu test. One event counts the primes below
//! `probe.max_prime` by trial division up to the square root, exactly as
//! sysbench's `cpu_execute_event` does; the run times `probe.events` events
//! with the TSC and reports events per second.

use super::Workload;
use crate::rt::{fail::Fail, tsc};
use crate::say;
use oxvirt_probe::{bootinfo::BootInfo, params::Params};

pub const WORKLOAD: Workload = Workload {
    name: "cpu",
    keys: &["max_prime", "events"],
    run,
};

fn run(_boot: &BootInfo, params: &Params) -> Result<(), Fail> {
    let max_prime = params.u64("max_prime", 10_000, 3, 1 << 32)?;
    let events = params.u64("events", 1000, 1, 1 << 40)?;
    let clock = tsc::Tsc::detect()?;
    let start = tsc::now();
    let mut primes = 0;
    for _ in 0..events {
        primes = count_primes(core::hint::black_box(max_prime));
    }
    let seconds = clock.seconds(tsc::now().wrapping_sub(start));
    say!(
        "PROBE RESULT cpu max_prime={max_prime} events={events} primes={primes} seconds={seconds:.6} events_s={:.2} tsc_khz={} tsc_source={}",
        events as f64 / seconds,
        clock.khz,
        clock.source
    );
    Ok(())
}

/// sysbench: `for (c = 3; c < max_prime; c++) { t = sqrt(c); for (l = 2;
/// l <= t; l++) if (c % l == 0) break; if (l > t) n++; }`
fn count_primes(max_prime: u64) -> u64 {
    let mut count = 0;
    for c in 3..max_prime {
        let t = sqrt(c as f64);
        let mut l = 2;
        while (l as f64) <= t {
            if c % l == 0 {
                break;
            }
            l += 1;
        }
        if (l as f64) > t {
            count += 1;
        }
    }
    count
}

/// `f64::sqrt` lives in std; this is the same single SSE2 instruction.
fn sqrt(x: f64) -> f64 {
    let root: f64;
    // SAFETY: sqrtsd only reads and writes xmm registers.
    unsafe {
        core::arch::asm!("sqrtsd {0}, {1}", out(xmm_reg) root, in(xmm_reg) x, options(pure, nomem, nostack))
    };
    root
}
