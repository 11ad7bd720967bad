//! XBZRLE: QEMU's delta encoding of a page against the copy sent before,
//! and its page cache.
//!
//! Encoding (QEMU's xbzrle.c): alternating runs over `old XOR new`, each a
//! ULEB128 length; a zero run (bytes unchanged) carries nothing more, a
//! non-zero run is followed by its new bytes. The first zero run may be
//! empty; a trailing zero run is left out. An encoding that would not fit
//! in a page overflows and the page goes in full.

use super::PAGE_SIZE;

/// Errors decoding an XBZRLE page.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XbzrleError {
    #[error("xbzrle: run length at encoded byte {at} is not a 1- or 2-byte ULEB128")]
    BadLength { at: usize },
    #[error("xbzrle: empty {run} run at encoded byte {at}")]
    EmptyRun { run: &'static str, at: usize },
    #[error("xbzrle: {run} run at encoded byte {at} runs past the end of the page")]
    PastPage { run: &'static str, at: usize },
    #[error("xbzrle: {len}-byte non-zero run at encoded byte {at} runs past the encoded data")]
    PastData { at: usize, len: usize },
}

fn push_uleb(out: &mut Vec<u8>, v: usize) {
    // Page offsets fit in 14 bits: at most two bytes (QEMU's uleb128_encode_small).
    if v < 0x80 {
        out.push(v as u8);
    } else {
        out.push((v & 0x7f) as u8 | 0x80);
        out.push((v >> 7) as u8);
    }
}

fn read_uleb(data: &[u8], at: &mut usize) -> Result<usize, XbzrleError> {
    let start = *at;
    let first = *data
        .get(start)
        .ok_or(XbzrleError::BadLength { at: start })?;
    if first & 0x80 == 0 {
        *at += 1;
        return Ok(first as usize);
    }
    let second = *data
        .get(start + 1)
        .ok_or(XbzrleError::BadLength { at: start })?;
    if second & 0x80 != 0 {
        return Err(XbzrleError::BadLength { at: start });
    }
    *at += 2;
    Ok((first & 0x7f) as usize | (second as usize) << 7)
}

/// Encodes `new` against `old` into `out` (cleared first), at most `limit`
/// bytes. Returns `Some(0)` when the pages are equal, `None` on overflow.
pub fn encode(old: &[u8], new: &[u8], out: &mut Vec<u8>, limit: usize) -> Option<usize> {
    debug_assert_eq!(old.len(), new.len());
    out.clear();
    let len = new.len();
    let mut i = 0;
    while i < len {
        let zrun = old[i..]
            .iter()
            .zip(&new[i..])
            .take_while(|(a, b)| a == b)
            .count();
        i += zrun;
        if i == len {
            break;
        }
        if out.len() + 2 > limit {
            return None;
        }
        push_uleb(out, zrun);
        let nzrun = old[i..]
            .iter()
            .zip(&new[i..])
            .take_while(|(a, b)| a != b)
            .count();
        if out.len() + 2 > limit {
            return None;
        }
        push_uleb(out, nzrun);
        if out.len() + nzrun > limit {
            return None;
        }
        out.extend_from_slice(&new[i..i + nzrun]);
        i += nzrun;
    }
    Some(out.len())
}

/// Applies an encoding to `page` (which holds the old contents).
pub fn decode(encoded: &[u8], page: &mut [u8]) -> Result<(), XbzrleError> {
    let mut at = 0;
    let mut i = 0;
    while at < encoded.len() {
        let zrun_at = at;
        let zrun = read_uleb(encoded, &mut at)?;
        if zrun == 0 && i != 0 {
            return Err(XbzrleError::EmptyRun {
                run: "zero",
                at: zrun_at,
            });
        }
        i += zrun;
        if i > page.len() {
            return Err(XbzrleError::PastPage {
                run: "zero",
                at: zrun_at,
            });
        }
        if at == encoded.len() {
            break;
        }
        let nzrun_at = at;
        let nzrun = read_uleb(encoded, &mut at)?;
        if nzrun == 0 {
            return Err(XbzrleError::EmptyRun {
                run: "non-zero",
                at: nzrun_at,
            });
        }
        if i + nzrun > page.len() {
            return Err(XbzrleError::PastPage {
                run: "non-zero",
                at: nzrun_at,
            });
        }
        let bytes = encoded.get(at..at + nzrun).ok_or(XbzrleError::PastData {
            at: nzrun_at,
            len: nzrun,
        })?;
        page[i..i + nzrun].copy_from_slice(bytes);
        at += nzrun;
        i += nzrun;
    }
    Ok(())
}

/// A cached page is protected from eviction for this many dirty syncs
/// (QEMU's CACHED_PAGE_LIFETIME).
const CACHED_PAGE_LIFETIME: u64 = 2;

struct CacheItem {
    addr: u64,
    age: u64,
    data: Box<[u8]>,
}

/// QEMU's page cache: direct-mapped by page address, a power-of-two number
/// of pages (xbzrle-cache-size rounded down), aged by dirty-sync count.
pub struct PageCache {
    items: Vec<Option<CacheItem>>,
}

impl PageCache {
    pub fn new(cache_size: u64) -> Self {
        let pages = (cache_size / PAGE_SIZE as u64).max(1);
        let pages = 1u64 << (63 - pages.leading_zeros());
        PageCache {
            items: (0..pages).map(|_| None).collect(),
        }
    }

    /// Pages the cache holds at most.
    pub fn capacity(&self) -> usize {
        self.items.len()
    }

    fn slot(&self, addr: u64) -> usize {
        ((addr / PAGE_SIZE as u64) as usize) & (self.items.len() - 1)
    }

    /// Whether `addr` is cached; a hit refreshes the page's age.
    pub fn is_cached(&mut self, addr: u64, age: u64) -> bool {
        let slot = self.slot(addr);
        match &mut self.items[slot] {
            Some(item) if item.addr == addr => {
                item.age = age;
                true
            }
            _ => false,
        }
    }

    /// The cached copy of `addr`.
    pub fn get_mut(&mut self, addr: u64) -> Option<&mut [u8]> {
        let slot = self.slot(addr);
        match &mut self.items[slot] {
            Some(item) if item.addr == addr => Some(&mut item.data),
            _ => None,
        }
    }

    /// Caches `data` for `addr`, unless the slot holds another page that is
    /// still fresh; returns whether it was cached.
    pub fn insert(&mut self, addr: u64, data: &[u8], age: u64) -> bool {
        let slot = self.slot(addr);
        if let Some(item) = &mut self.items[slot] {
            if item.addr != addr && item.age + CACHED_PAGE_LIFETIME > age {
                return false;
            }
            item.addr = addr;
            item.age = age;
            item.data.copy_from_slice(data);
            return true;
        }
        self.items[slot] = Some(CacheItem {
            addr,
            age,
            data: data.into(),
        });
        true
    }
}

/// What to send for a dirty page.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Same as the copy the destination holds: nothing to send.
    Unchanged,
    /// Send the encoding left in the encoder's buffer.
    Encoded,
    /// Send the page in full (cache miss or overflow).
    Full,
}

/// Counters for `query-migrate`'s xbzrle-cache member.
#[derive(Debug, Default, Clone, Copy)]
pub struct XbzrleCounters {
    pub bytes: u64,
    pub pages: u64,
    pub cache_miss: u64,
    pub overflow: u64,
    /// Pages looked up in the cache.
    pub lookups: u64,
}

/// The source's XBZRLE state: cache, scratch buffer, counters.
pub struct Encoder {
    cache: PageCache,
    buf: Vec<u8>,
    pub counters: XbzrleCounters,
}

impl Encoder {
    pub fn new(cache_size: u64) -> Self {
        Encoder {
            cache: PageCache::new(cache_size),
            buf: Vec::with_capacity(PAGE_SIZE),
            counters: XbzrleCounters::default(),
        }
    }

    /// Decides how `page` (a private copy of guest memory) goes; `age` is the
    /// dirty-sync count. The cache always ends up equal to what is sent.
    pub fn save_page(&mut self, addr: u64, page: &[u8], age: u64) -> Outcome {
        self.counters.lookups += 1;
        if !self.cache.is_cached(addr, age) {
            self.counters.cache_miss += 1;
            self.cache.insert(addr, page, age);
            return Outcome::Full;
        }
        let Some(cached) = self.cache.get_mut(addr) else {
            return Outcome::Full;
        };
        match encode(cached, page, &mut self.buf, PAGE_SIZE) {
            Some(0) => Outcome::Unchanged,
            None => {
                self.counters.overflow += 1;
                cached.copy_from_slice(page);
                Outcome::Full
            }
            Some(n) => {
                self.counters.pages += 1;
                self.counters.bytes += n as u64;
                cached.copy_from_slice(page);
                Outcome::Encoded
            }
        }
    }

    /// A page sent as zero: a cached copy must become zero too.
    pub fn zero_page(&mut self, addr: u64) {
        if let Some(cached) = self.cache.get_mut(addr) {
            cached.fill(0);
        }
    }

    /// The encoding of the last `Outcome::Encoded` page.
    pub fn encoded(&self) -> &[u8] {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift64*) for property tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn known_encoding_matches_qemus_format() {
        let old = [0u8; PAGE_SIZE];
        let mut new = old;
        new[0] = 1;
        new[200] = 2;
        new[201] = 3;
        let mut out = Vec::new();
        let n = encode(&old, &new, &mut out, PAGE_SIZE).unwrap();
        // zrun 0, nzrun 1, [1], zrun 199 (0xc7 0x01), nzrun 2, [2, 3]; no trailing zrun.
        assert_eq!(out, [0, 1, 1, 0xc7, 0x01, 2, 2, 3]);
        assert_eq!(n, 8);
        let mut page = old;
        decode(&out, &mut page).unwrap();
        assert_eq!(page, new);
    }

    #[test]
    fn equal_pages_encode_to_nothing_and_random_pages_overflow() {
        let page = [5u8; PAGE_SIZE];
        let mut out = Vec::new();
        assert_eq!(encode(&page, &page, &mut out, PAGE_SIZE), Some(0));
        let mut rng = Rng(7);
        let noisy: Vec<u8> = (0..PAGE_SIZE).map(|_| rng.next() as u8).collect();
        // Alternating equal/different bytes cost 3 bytes per 2: overflow.
        let alternating: Vec<u8> = (0..PAGE_SIZE)
            .map(|i| if i % 2 == 0 { 5 } else { 6 })
            .collect();
        assert_eq!(encode(&page, &alternating, &mut out, PAGE_SIZE), None);
        // Random bytes differ almost everywhere: fits (one long nzrun + headers)
        // only if the runs are long; either way it never exceeds the limit.
        if let Some(n) = encode(&page, &noisy, &mut out, PAGE_SIZE) {
            assert!(n <= PAGE_SIZE);
        }
    }

    #[test]
    fn random_round_trips() {
        let mut rng = Rng(0x1234_5678);
        let mut out = Vec::new();
        for round in 0..2000 {
            let old: Vec<u8> = (0..PAGE_SIZE).map(|_| rng.next() as u8).collect();
            let mut new = old.clone();
            let changes = rng.below(if round % 3 == 0 { 2000 } else { 40 });
            for _ in 0..changes {
                let at = rng.below(PAGE_SIZE);
                let run = 1 + rng.below(64).min(PAGE_SIZE - at - 1);
                for b in &mut new[at..at + run] {
                    *b = b.wrapping_add(1 + rng.below(255) as u8);
                }
            }
            match encode(&old, &new, &mut out, PAGE_SIZE) {
                None => continue,
                Some(_) => {
                    let mut page = old.clone();
                    decode(&out, &mut page).unwrap();
                    assert_eq!(page, new, "round {round}");
                    assert!(out.len() <= PAGE_SIZE);
                }
            }
        }
    }

    #[test]
    fn hostile_encodings_are_rejected_without_panic() {
        let mut page = [0u8; PAGE_SIZE];
        assert_eq!(
            decode(&[0x80], &mut page),
            Err(XbzrleError::BadLength { at: 0 })
        );
        assert_eq!(
            decode(&[0xff, 0xff, 1], &mut page),
            Err(XbzrleError::BadLength { at: 0 })
        );
        assert_eq!(
            decode(&[0, 1, 1, 0, 1, 1], &mut page),
            Err(XbzrleError::EmptyRun { run: "zero", at: 3 })
        );
        assert_eq!(
            decode(&[0, 0], &mut page),
            Err(XbzrleError::EmptyRun {
                run: "non-zero",
                at: 1
            })
        );
        assert_eq!(
            decode(&[0xff, 0x7f], &mut page),
            Err(XbzrleError::PastPage { run: "zero", at: 0 })
        );
        assert_eq!(
            decode(&[0, 5, 1, 2], &mut page),
            Err(XbzrleError::PastData { at: 1, len: 5 })
        );
        let mut rng = Rng(99);
        for _ in 0..20_000 {
            let len = rng.below(16);
            let junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let _ = decode(&junk, &mut page);
        }
    }

    #[test]
    fn cache_size_rounds_down_to_a_power_of_two() {
        assert_eq!(PageCache::new(64 << 20).capacity(), 16384);
        assert_eq!(PageCache::new(3 * PAGE_SIZE as u64).capacity(), 2);
        assert_eq!(PageCache::new(1).capacity(), 1);
    }

    #[test]
    fn fresh_pages_are_not_evicted_and_old_ones_are() {
        let mut cache = PageCache::new(2 * PAGE_SIZE as u64);
        let a = [1u8; PAGE_SIZE];
        assert!(cache.insert(0, &a, 1));
        // Page 2 maps to the same slot as page 0 in a 2-page cache.
        let other = 2 * PAGE_SIZE as u64;
        assert!(!cache.insert(other, &a, 2), "page 0 is still fresh");
        assert!(cache.is_cached(0, 2));
        assert!(cache.insert(other, &a, 4), "page 0 aged out");
        assert!(!cache.is_cached(0, 4));
        assert!(cache.is_cached(other, 4));
    }

    #[test]
    fn encoder_misses_then_encodes_and_counts() {
        let mut enc = Encoder::new(64 << 20);
        let mut page = vec![3u8; PAGE_SIZE];
        assert_eq!(enc.save_page(4096, &page, 1), Outcome::Full);
        assert_eq!(enc.counters.cache_miss, 1);
        assert_eq!(enc.save_page(4096, &page, 2), Outcome::Unchanged);
        page[10] = 9;
        assert_eq!(enc.save_page(4096, &page, 3), Outcome::Encoded);
        assert_eq!(enc.encoded(), [10, 1, 9]);
        assert_eq!((enc.counters.pages, enc.counters.bytes), (1, 3));
        // The cache now holds what was sent: the same page is unchanged.
        assert_eq!(enc.save_page(4096, &page, 4), Outcome::Unchanged);
        let alternating: Vec<u8> = (0..PAGE_SIZE).map(|i| (i % 2) as u8 + 100).collect();
        assert_eq!(enc.save_page(4096, &alternating, 5), Outcome::Full);
        assert_eq!(enc.counters.overflow, 1);
        enc.zero_page(4096);
        assert_eq!(
            enc.save_page(4096, &[0u8; PAGE_SIZE], 6),
            Outcome::Unchanged
        );
    }
}
