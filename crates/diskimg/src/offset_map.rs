//! Hash maps keyed by file offsets. The metadata caches look one up on
//! every guest request; SipHash (std's default) is most of that cost.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

pub type OffsetMap<V> = HashMap<u64, V, BuildHasherDefault<OffsetHasher>>;

/// Mixes a u64 key (a cluster-aligned offset: its low bits are all zero)
/// so that the hash's low and high bits both vary.
#[derive(Default)]
pub struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, x: u64) {
        let h = (self.0 ^ x ^ (x >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 32);
    }
}
