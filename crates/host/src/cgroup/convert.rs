//! Conversions between the v1 and v2 knobs and Docker's memory rules.

use crate::size::MemorySwap;

use super::CgroupError;

pub const MIN_SHARES: u64 = 2;
pub const MAX_SHARES: u64 = 262_144;
pub const MIN_BLKIO_WEIGHT: u64 = 10;
pub const MAX_BLKIO_WEIGHT: u64 = 1000;
/// Docker's smallest `--memory` (6 MiB).
pub const MIN_MEMORY: u64 = 6 << 20;

/// v1 `cpu.shares` to v2 `cpu.weight`, as libvirt, runc and Docker convert:
/// 2..262144 maps linearly onto 1..10000 (1024 → 39).
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(MIN_SHARES, MAX_SHARES);
    1 + ((shares - 2) * 9999) / 262_142
}

/// The inverse of [`shares_to_weight`] (libvirt's, for reading v2 back).
pub fn weight_to_shares(weight: u64) -> u64 {
    let weight = weight.clamp(1, 10_000);
    2 + ((weight - 1) * 262_142) / 9999
}

/// v1 `blkio.weight` (10..1000) to v2 `io.weight` (1..10000), as runc does.
pub fn blkio_weight_to_io_weight(weight: u64) -> u64 {
    1 + (weight.clamp(MIN_BLKIO_WEIGHT, MAX_BLKIO_WEIGHT) - 10) * 9999 / 990
}

/// The inverse of [`blkio_weight_to_io_weight`].
pub fn io_weight_to_blkio_weight(weight: u64) -> u64 {
    10 + (weight.clamp(1, 10_000) - 1) * 990 / 9999
}

/// Docker's `--memory-swap` rules: the memory+swap limit for a memory limit.
/// Unset means twice the memory, `-1` unlimited, a value must be at least
/// the memory; a swap limit without a memory limit is refused.
pub fn memory_plus_swap(memory: Option<u64>, swap: MemorySwap) -> Result<Option<u64>, CgroupError> {
    let invalid = |reason: &str| CgroupError::InvalidValue {
        setting: "memory-swap",
        value: format!("{swap:?}"),
        reason: reason.to_owned(),
    };
    match (memory, swap) {
        (None, MemorySwap::Unset | MemorySwap::Unlimited) => Ok(None),
        (None, MemorySwap::Limit(_)) => {
            Err(invalid("a memory+swap limit needs a memory limit too"))
        }
        (Some(mem), MemorySwap::Unset) => Ok(Some(mem.saturating_mul(2))),
        (Some(_), MemorySwap::Unlimited) => Ok(None),
        (Some(mem), MemorySwap::Limit(total)) if total < mem => Err(invalid(&format!(
            "memory+swap ({total} bytes) must be at least the memory limit ({mem} bytes)"
        ))),
        (Some(_), MemorySwap::Limit(total)) => Ok(Some(total)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_weight() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(100), 4);
        assert_eq!(shares_to_weight(0), 1);
        assert_eq!(weight_to_shares(1), 2);
        assert_eq!(weight_to_shares(10_000), 262_144);
        for shares in [2, 100, 512, 1024, 4096, 262_144] {
            let back = weight_to_shares(shares_to_weight(shares));
            assert!(back <= shares && shares - back < 27, "{shares} -> {back}");
        }
    }

    #[test]
    fn blkio_weight() {
        assert_eq!(blkio_weight_to_io_weight(10), 1);
        assert_eq!(blkio_weight_to_io_weight(1000), 10_000);
        assert_eq!(blkio_weight_to_io_weight(500), 4950);
        assert_eq!(io_weight_to_blkio_weight(4950), 500);
        assert_eq!(io_weight_to_blkio_weight(10_000), 1000);
    }

    #[test]
    fn docker_swap_rules() {
        let m = 20 << 20;
        assert_eq!(
            memory_plus_swap(Some(m), MemorySwap::Unset).unwrap(),
            Some(2 * m)
        );
        assert_eq!(
            memory_plus_swap(Some(m), MemorySwap::Unlimited).unwrap(),
            None
        );
        assert_eq!(
            memory_plus_swap(Some(m), MemorySwap::Limit(30 << 20)).unwrap(),
            Some(30 << 20)
        );
        assert_eq!(
            memory_plus_swap(Some(m), MemorySwap::Limit(m)).unwrap(),
            Some(m)
        );
        assert_eq!(memory_plus_swap(None, MemorySwap::Unset).unwrap(), None);
        let err = memory_plus_swap(Some(m), MemorySwap::Limit(m - 1)).unwrap_err();
        assert!(
            err.to_string().contains("at least the memory limit"),
            "{err}"
        );
        assert!(memory_plus_swap(None, MemorySwap::Limit(m)).is_err());
    }
}
