//! The `blk` workload's data pattern, fixed so the host can check a disk
//! the guest wrote and write one the guest checks: every 8-byte
//! little-endian word of 512-byte sector N holds `N ^ seed`.

pub const SECTOR: usize = 512;
const WORD: usize = 8;

/// A word that does not hold the pattern.
#[derive(Debug, PartialEq)]
pub struct Mismatch {
    pub sector: u64,
    pub offset: usize,
    pub found: u64,
    pub expected: u64,
}

/// Fills `buf` (whole sectors) as sectors `first`, `first + 1`, ...
pub fn fill(buf: &mut [u8], first: u64, seed: u64) {
    for (index, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
        let word = ((first + index as u64) ^ seed).to_le_bytes();
        for slot in sector.chunks_exact_mut(WORD) {
            slot.copy_from_slice(&word);
        }
    }
}

/// The first word of `buf` (sectors from `first`) that breaks the pattern.
pub fn check(buf: &[u8], first: u64, seed: u64) -> Result<(), Mismatch> {
    for (index, sector_bytes) in buf.chunks_exact(SECTOR).enumerate() {
        let sector = first + index as u64;
        let expected = sector ^ seed;
        for (word_index, word) in sector_bytes.chunks_exact(WORD).enumerate() {
            let found = u64::from_le_bytes(word.try_into().unwrap_or([0; WORD]));
            if found != expected {
                return Err(Mismatch {
                    sector,
                    offset: word_index * WORD,
                    found,
                    expected,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_round_trips_and_finds_a_flipped_bit() {
        let mut buf = vec![0; 4 * SECTOR];
        fill(&mut buf, 10, 0xabcd);
        assert_eq!(&buf[..8], &(10u64 ^ 0xabcd).to_le_bytes());
        assert_eq!(&buf[3 * SECTOR + 504..], &(13u64 ^ 0xabcd).to_le_bytes());
        assert_eq!(check(&buf, 10, 0xabcd), Ok(()));
        assert!(check(&buf, 11, 0xabcd).is_err());
        buf[2 * SECTOR + 17] ^= 1;
        let mismatch = check(&buf, 10, 0xabcd).unwrap_err();
        assert_eq!((mismatch.sector, mismatch.offset), (12, 16));
        assert_eq!(mismatch.expected, 12 ^ 0xabcd);
    }
}
