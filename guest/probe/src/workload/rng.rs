//! `rng`: reads `probe.bytes` bytes of entropy from a virtio-rng device and
//! checks they are not constant: at least a quarter of the 256 byte values
//! must occur (a healthy source shows all of them within a few KiB; a
//! device that returns zeros or one repeated block does not).

use super::Workload;
use crate::rt::fail::Fail;
use crate::rt::tsc::{self, Tsc};
use crate::rt::virtio::{self, ProbeHal};
use crate::{fail, say};
use oxvirt_probe::{bootinfo::BootInfo, params::Params};
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::DeviceType;

pub const WORKLOAD: Workload = Workload {
    name: "rng",
    keys: &["bytes"],
    run,
};

/// Bytes asked for per request (the device may return fewer).
const CHUNK: usize = 4096;
/// Fewest distinct byte values a sample must hold.
const MIN_DISTINCT: usize = 64;

fn run(boot: &BootInfo, params: &Params) -> Result<(), Fail> {
    let bytes = params.u64("bytes", 4096, 1024, 1 << 30)?;
    let clock = Tsc::detect()?;
    virtio::init(boot);
    let mut rng = VirtIORng::<ProbeHal, _>::new(virtio::find(boot, DeviceType::EntropySource)?)?;
    let buf = virtio::alloc(CHUNK)?;
    let mut seen = [false; 256];
    let mut total = 0u64;
    let mut requests = 0u64;
    let start = tsc::now();
    while total < bytes {
        let want = CHUNK.min((bytes - total) as usize);
        let got = rng.request_entropy(&mut buf[..want])?;
        if got == 0 || got > want {
            return fail!("rng: the device returned {got} bytes for a request of {want}");
        }
        for &byte in &buf[..got] {
            seen[byte as usize] = true;
        }
        total += got as u64;
        requests += 1;
    }
    let seconds = clock.seconds(tsc::now().wrapping_sub(start));
    let distinct = seen.iter().filter(|&&s| s).count();
    say!(
        "PROBE RESULT rng bytes={total} requests={requests} distinct={distinct} seconds={seconds:.6} kb_s={:.1}",
        total as f64 / 1000.0 / seconds
    );
    if distinct < MIN_DISTINCT {
        return fail!("rng: {total} bytes hold only {distinct} distinct values (constant source?)");
    }
    Ok(())
}
