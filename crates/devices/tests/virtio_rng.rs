//! virtio-rng driven through its virtio-mmio transport.

mod common;

use std::time::{Duration, Instant};

use common::*;
use devices::rate_limiter::{BucketConfig, LimiterConfig};
use devices::virtio::rng::{Rng, RngState};
use devices::virtio::MmioTransport;
use vm_memory::{Bytes, GuestAddress};

fn driver(limit: LimiterConfig) -> Driver<Rng> {
    let mut d = Driver::new(Rng::new(limit).unwrap());
    d.init(u64::MAX, 1, 64);
    assert_eq!(d.read_reg(0x008), 4);
    d
}

fn read_back(d: &Driver<Rng>, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    d.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

#[test]
fn fills_guest_buffers_with_entropy() {
    let mut d = driver(LimiterConfig::default());
    let (_, len) = d.submit(0, &[wr(DATA_BASE, 1000), wr(DATA_BASE + 0x1000, 3000)]);
    assert_eq!(len, 4000);
    let a = read_back(&d, DATA_BASE, 1000);
    let b = read_back(&d, DATA_BASE + 0x1000, 3000);
    // 4000 random bytes: not constant, and no value dominates.
    let mut counts = [0usize; 256];
    for &x in a.iter().chain(&b) {
        counts[x as usize] += 1;
    }
    assert!(counts.iter().all(|&c| c < 100), "suspicious distribution");
    let (_, len) = d.submit(0, &[wr(DATA_BASE, 1000)]);
    assert_eq!(len, 1000);
    assert_ne!(read_back(&d, DATA_BASE, 1000), a, "same entropy twice");
    let stats = d.transport.device().stats();
    assert_eq!((stats.requests, stats.bytes, stats.errors), (2, 5000, 0));
}

#[test]
fn malformed_chains_get_nothing_and_the_device_keeps_working() {
    let mut d = driver(LimiterConfig::default());
    // Device-readable buffer, buffer outside memory, a loop.
    assert_eq!(d.submit(0, &[rd(DATA_BASE, 64)]).1, 0);
    assert_eq!(d.submit(0, &[wr(u64::MAX - 10, 64)]).1, 0);
    let q = &mut d.queues[0];
    q.write_desc(
        &d.mem,
        10,
        DATA_BASE,
        16,
        VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
        11,
    );
    q.write_desc(
        &d.mem,
        11,
        DATA_BASE,
        16,
        VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
        10,
    );
    q.publish(&d.mem, 10);
    d.notify(0);
    assert_eq!(
        d.queues[0].wait_used(&d.mem, Duration::from_secs(5)),
        Some((10, 0))
    );
    d.queues[0].set_next_desc(20);
    assert_eq!(d.submit(0, &[wr(DATA_BASE, 64)]).1, 64);
    assert_eq!(d.transport.device().stats().errors, 3);
}

#[test]
fn heavy_rate_limit_paces_entropy() {
    let limit = LimiterConfig {
        bandwidth: Some(BucketConfig::per_second(40_000, 0)),
        ops: None,
    };
    let mut d = driver(limit);
    let start = Instant::now();
    for _ in 0..10 {
        assert_eq!(d.submit(0, &[wr(DATA_BASE, 4000)]).1, 4000);
    }
    // 40 000 bytes at 40 000/s, less the 4 000-byte bucket that starts full.
    let took = start.elapsed().as_secs_f64();
    assert!((0.85..1.3).contains(&took), "took {took:.2} s");
}

#[test]
fn save_and_restore_keep_the_limit_and_the_queue() {
    let limit = LimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig::per_second(1000, 0)),
    };
    let mut d = driver(limit);
    assert_eq!(d.submit(0, &[wr(DATA_BASE, 32)]).1, 32);
    let state = d.transport.save();
    let rng_state: RngState =
        serde_json::from_str(&serde_json::to_string(&d.transport.device().save()).unwrap())
            .unwrap();
    assert_eq!(rng_state.limit, limit);
    let mut restored = MmioTransport::restore(
        Rng::restore(&rng_state).unwrap(),
        d.mem.clone(),
        d.irq.clone(),
        &state,
    )
    .unwrap();
    restored.resume();
    d.transport = restored;
    assert_eq!(d.submit(0, &[wr(DATA_BASE, 32)]).1, 32);
    let bad = RngState {
        version: 7,
        ..rng_state
    };
    assert!(Rng::restore(&bad)
        .err()
        .unwrap()
        .to_string()
        .contains("version 7"));
}
