//! 4 KiB random I/O through the library: `iops OPS read|write FILE...`.
//! The files take turns, `ROUNDS` rounds of OPS / ROUNDS operations each,
//! so that whatever else loads the machine weighs on every file alike.
//! Prints a line per file, in the order given: operations per second of
//! wall time and per second of this thread's CPU time. bench/img.sh runs
//! it on a fully allocated qcow2 image and a raw file of the same size.

use std::time::{Duration, Instant};

use diskimg::BlockDevice;

const ROUNDS: u64 = 20;

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One file under test: its device, its own random offsets, the time spent.
struct Target {
    dev: Box<dyn BlockDevice>,
    seed: u64,
    wall: Duration,
    cpu: Duration,
}

impl Target {
    fn run(&mut self, ops: u64, write: bool, buf: &mut [u8]) -> diskimg::Result<()> {
        let blocks = self.dev.size() / 4096;
        let (start, cpu_start) = (Instant::now(), thread_cpu());
        for _ in 0..ops {
            let x = &mut self.seed;
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            let off = (*x % blocks) * 4096;
            if write {
                self.dev.write_at(buf, off)?;
            } else {
                self.dev.read_at(buf, off)?;
            }
        }
        self.wall += start.elapsed();
        self.cpu += thread_cpu() - cpu_start;
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, ops, mode, paths @ ..] = args.as_slice() else {
        return Err("usage: iops OPS read|write FILE...".into());
    };
    let per_round = ops.parse::<u64>()?.div_ceil(ROUNDS);
    let write = match mode.as_str() {
        "read" => false,
        "write" => true,
        _ => return Err(format!("mode must be read or write, not {mode}").into()),
    };
    let mut targets = paths
        .iter()
        .map(|p| {
            Ok(Target {
                dev: diskimg::open(std::path::Path::new(p), !write, None)?,
                seed: 0x9e37_79b9_7f4a_7c15,
                wall: Duration::ZERO,
                cpu: Duration::ZERO,
            })
        })
        .collect::<diskimg::Result<Vec<_>>>()?;
    // Page aligned, as guest memory is: the kernel's copy into a buffer
    // 16 bytes off alignment costs several times as much.
    let mut backing = vec![0x5au8; 2 * 4096];
    let at = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[at..at + 4096];
    for _ in 0..ROUNDS {
        for t in &mut targets {
            t.run(per_round, write, buf)?;
        }
    }
    for t in &mut targets {
        if write {
            t.dev.flush()?;
        }
        let ops = (per_round * ROUNDS) as f64;
        println!(
            "{:.0} {:.0}",
            ops / t.wall.as_secs_f64(),
            ops / t.cpu.as_secs_f64()
        );
    }
    Ok(())
}
