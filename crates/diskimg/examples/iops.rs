//! 4 KiB random I/O through the library: `iops FILE OPS read|write`.
//! Prints operations per second of wall time and per second of this
//! process's CPU time (the second holds on a loaded machine too).
//! bench/img.sh runs it on a raw file and on a fully allocated qcow2
//! image of the same size.

use std::time::Instant;

/// Nanoseconds this process has run on a CPU (/proc/self/schedstat).
fn cpu_ns() -> Result<u64, Box<dyn std::error::Error>> {
    let stat = std::fs::read_to_string("/proc/self/schedstat")?;
    let first = stat.split_whitespace().next().ok_or("empty schedstat")?;
    Ok(first.parse()?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, path, ops, mode] = args.as_slice() else {
        return Err("usage: iops FILE OPS read|write".into());
    };
    let ops: u64 = ops.parse()?;
    let write = match mode.as_str() {
        "read" => false,
        "write" => true,
        _ => return Err(format!("mode must be read or write, not {mode}").into()),
    };
    let dev = diskimg::open(std::path::Path::new(path), !write, None)?;
    let blocks = dev.size() / 4096;
    // Page aligned, as guest memory is: the kernel's copy into a buffer
    // 16 bytes off alignment costs several times as much.
    let mut backing = vec![0x5au8; 2 * 4096];
    let at = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[at..at + 4096];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let start = Instant::now();
    let cpu_start = cpu_ns()?;
    for _ in 0..ops {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % blocks) * 4096;
        if write {
            dev.write_at(buf, off)?;
        } else {
            dev.read_at(buf, off)?;
        }
    }
    if write {
        dev.flush()?;
    }
    let cpu = (cpu_ns()? - cpu_start) as f64 / 1e9;
    println!(
        "{:.0} {:.0}",
        ops as f64 / start.elapsed().as_secs_f64(),
        ops as f64 / cpu
    );
    Ok(())
}
