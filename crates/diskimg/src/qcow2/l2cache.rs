//! The L2 table cache, keyed by a table's host offset.
//!
//! Guest reads run under the image's shared lock; a read whose table is
//! cached takes no other lock and allocates nothing: `tables` changes only
//! under the exclusive lock (`&mut self`). A reader that misses loads the
//! table into `loaded`, behind a mutex; whoever next has `&mut self` moves
//! those tables into `tables` (`settle`), and readers try to do that as
//! soon as their read is done.
//!
//! The cache holds at most `MAX_BYTES` of tables, QEMU's default maximum on
//! Linux (a whole 256 GiB image with 64 KiB clusters); it only grows as
//! tables are read, so a small image never takes more than its tables.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::error::Result;
use crate::offset_map::OffsetMap;

/// Most memory the cached tables of one image take.
const MAX_BYTES: u64 = 32 << 20;
/// Fewest tables kept, whatever the cluster size (a request may span two).
const MIN_TABLES: usize = 2;

pub struct L2Cache {
    tables: OffsetMap<Box<[u64]>>,
    /// Tables read under the shared lock since the last `settle`.
    loaded: Mutex<OffsetMap<Box<[u64]>>>,
    /// Whether `loaded` holds anything (checked without its lock).
    pending: AtomicBool,
    max_tables: usize,
}

impl L2Cache {
    /// A cache for tables of `table_bytes` each.
    pub fn new(table_bytes: u64) -> L2Cache {
        let fit = (MAX_BYTES / table_bytes.max(1)) as usize;
        L2Cache {
            tables: OffsetMap::default(),
            loaded: Mutex::new(OffsetMap::default()),
            pending: AtomicBool::new(false),
            max_tables: fit.max(MIN_TABLES),
        }
    }

    /// The table at `offset`, read by `load` if it is not cached, passed
    /// to `f`.
    pub fn with<T>(
        &self,
        offset: u64,
        load: impl FnOnce() -> Result<Box<[u64]>>,
        f: impl FnOnce(&[u64]) -> T,
    ) -> Result<T> {
        if let Some(t) = self.tables.get(&offset) {
            return Ok(f(t));
        }
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = loaded.get(&offset) {
            return Ok(f(t));
        }
        let table = load()?;
        if self.tables.len() + loaded.len() >= self.max_tables {
            loaded.clear();
        }
        self.pending.store(true, Ordering::Release);
        Ok(f(loaded.entry(offset).or_insert(table)))
    }

    /// Whether readers loaded tables that `settle` has yet to move.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Moves the tables readers loaded into `tables`, evicting others
    /// where the cache is full.
    pub fn settle(&mut self) {
        if !self.pending() {
            return;
        }
        let loaded = std::mem::take(self.loaded.get_mut().unwrap_or_else(|e| e.into_inner()));
        self.pending.store(false, Ordering::Release);
        for (offset, table) in loaded {
            self.insert(offset, table);
        }
    }

    /// The cached table at `offset`, to change along with the file.
    pub fn get_mut(&mut self, offset: u64) -> Option<&mut [u64]> {
        self.settle();
        self.tables.get_mut(&offset).map(|t| &mut t[..])
    }

    /// Caches `table` (just written to the file) at `offset`.
    pub fn insert(&mut self, offset: u64, table: Box<[u64]>) {
        self.settle();
        if !self.tables.contains_key(&offset) && self.tables.len() >= self.max_tables {
            let victim = self.tables.keys().next().copied();
            if let Some(v) = victim {
                self.tables.remove(&v);
            }
        }
        self.tables.insert(offset, table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(v: u64) -> Result<Box<[u64]>> {
        Ok(vec![v; 4].into_boxed_slice())
    }

    #[test]
    fn a_table_loaded_by_a_reader_is_found_again_and_settles() {
        let mut c = L2Cache::new(32);
        assert_eq!(c.with(0x1000, || table(7), |t| t[0]).unwrap(), 7);
        assert!(c.pending());
        let loads_again = c.with(0x1000, || table(9), |t| t[0]).unwrap();
        assert_eq!(
            loads_again, 7,
            "the second lookup must hit the loaded table"
        );
        c.settle();
        assert!(!c.pending());
        c.get_mut(0x1000).unwrap()[1] = 5;
        assert_eq!(c.with(0x1000, || table(9), |t| t[1]).unwrap(), 5);
    }

    #[test]
    fn the_cache_never_holds_more_than_its_limit() {
        let mut c = L2Cache::new(MAX_BYTES / 3);
        for i in 0..10u64 {
            c.with(i << 16, || table(i), |_| ()).unwrap();
            c.settle();
            c.insert((i + 100) << 16, table(i).unwrap());
            assert!(c.tables.len() <= 3, "{} tables cached", c.tables.len());
        }
        assert_eq!(L2Cache::new(64 << 10).max_tables, 512);
        assert_eq!(L2Cache::new(MAX_BYTES).max_tables, MIN_TABLES);
    }

    #[test]
    fn a_failed_load_caches_nothing() {
        let c = L2Cache::new(32);
        let failed = c.with(
            0x2000,
            || Err(crate::error::Error::Usage("no".into())),
            |t: &[u64]| t[0],
        );
        assert!(failed.is_err());
        assert!(!c.pending());
        assert_eq!(c.with(0x2000, || table(3), |t| t[0]).unwrap(), 3);
    }
}
