//! The probe guest's pure logic, kept apart from the freestanding binary
//! (`main.rs`) so that it can be unit-tested on the host with hostile
//! input: the command-line protocol (`params`), the PVH boot information
//! (`bootinfo`), the firmware tables that list the CPUs (`firmware`), the
//! virtio-mmio devices named on the command line (`virtio_mmio`) and the
//! `blk` workload's data pattern (`blkpattern`).
//! Everything here reads guest memory through `PhysMem`, which the guest
//! implements over its identity map and the tests over a byte buffer.

#![cfg_attr(not(test), no_std)]

pub mod blkpattern;
pub mod bootinfo;
pub mod firmware;
pub mod netaddr;
pub mod params;
pub mod virtio_mmio;

/// CPUs the probe can bring up (its per-CPU stacks and TSSs are static).
pub const MAX_CPUS: usize = 32;

/// Guest-physical memory, read-only.
pub trait PhysMem {
    /// The `len` bytes at `paddr`, or `None` when any of them is outside
    /// the memory this view can read.
    fn bytes(&self, paddr: u64, len: u64) -> Option<&[u8]>;
}

/// Little-endian reads from a byte slice; out-of-range bytes read as 0
/// (callers bound-check lengths first; this only keeps bad input from
/// turning into a panic).
pub(crate) fn le(bytes: &[u8], off: usize, len: usize) -> u64 {
    (0..len).fold(0, |value, i| {
        value | u64::from(bytes.get(off + i).copied().unwrap_or(0)) << (8 * i)
    })
}

#[cfg(test)]
pub(crate) mod testmem {
    use super::PhysMem;

    /// Guest memory from physical address 0 in a byte buffer.
    pub struct TestMem(pub Vec<u8>);

    impl TestMem {
        pub fn new(size: usize) -> Self {
            TestMem(vec![0; size])
        }

        pub fn put(&mut self, paddr: u64, bytes: &[u8]) {
            self.0[paddr as usize..paddr as usize + bytes.len()].copy_from_slice(bytes);
        }
    }

    impl PhysMem for TestMem {
        fn bytes(&self, paddr: u64, len: u64) -> Option<&[u8]> {
            let end = paddr.checked_add(len)?;
            self.0
                .get(usize::try_from(paddr).ok()?..usize::try_from(end).ok()?)
        }
    }
}
