//! qcow2 refcounts: a two-level table of per-cluster reference counts of
//! 1 to 64 bits. Blocks are cached once read; every change is written
//! through at once, entry by entry, so metadata order on disk is the order
//! of the calls.

use crate::disk::{be64_at, Disk};
use crate::error::{corrupt, Result};
use crate::offset_map::OffsetMap;

const OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

pub struct Refcounts {
    order: u32,
    cluster_bits: u32,
    pub table: Vec<u64>,
    pub table_offset: u64,
    blocks: OffsetMap<Vec<u8>>,
    free_hint: u64,
}

/// Reads entry `i` of a refcount block of `1 << order`-bit entries.
pub fn get_entry(block: &[u8], order: u32, i: u64) -> u64 {
    let bits = 1u64 << order;
    if bits < 8 {
        let byte = block[(i * bits / 8) as usize];
        let shift = (i * bits) % 8;
        u64::from(byte >> shift) & ((1 << bits) - 1)
    } else {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        block[at..at + n]
            .iter()
            .fold(0, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Writes entry `i`; returns the byte range that changed.
fn set_entry(block: &mut [u8], order: u32, i: u64, value: u64) -> std::ops::Range<usize> {
    let bits = 1u64 << order;
    if bits < 8 {
        let at = (i * bits / 8) as usize;
        let shift = (i * bits) % 8;
        let mask = (((1u64 << bits) - 1) << shift) as u8;
        block[at] = (block[at] & !mask) | (((value << shift) as u8) & mask);
        at..at + 1
    } else {
        let n = (bits / 8) as usize;
        let at = i as usize * n;
        let bytes = value.to_be_bytes();
        block[at..at + n].copy_from_slice(&bytes[8 - n..]);
        at..at + n
    }
}

impl Refcounts {
    pub fn load(
        disk: &Disk,
        order: u32,
        cluster_bits: u32,
        offset: u64,
        clusters: u32,
    ) -> Result<Refcounts> {
        let mut raw = vec![0u8; (u64::from(clusters) << cluster_bits) as usize];
        disk.read_meta(&mut raw, offset, "refcount table")?;
        let table = (0..raw.len() / 8).map(|i| be64_at(&raw, i * 8)).collect();
        Ok(Refcounts {
            order,
            cluster_bits,
            table,
            table_offset: offset,
            blocks: OffsetMap::default(),
            free_hint: 0,
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries per refcount block.
    pub fn per_block(&self) -> u64 {
        (self.cluster_size() * 8) >> self.order
    }

    pub fn max(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1 << (1 << self.order)) - 1
        }
    }

    pub fn table_clusters(&self) -> u64 {
        (self.table.len() as u64 * 8).div_ceil(self.cluster_size())
    }

    /// The offset of block `t`, validated; 0 where there is none.
    pub fn block_offset(&self, disk: &Disk, t: usize) -> Result<u64> {
        let Some(&entry) = self.table.get(t) else {
            return Ok(0);
        };
        let off = entry & OFFSET_MASK;
        if !off.is_multiple_of(self.cluster_size()) {
            return Err(corrupt(
                &disk.path,
                format!("refcount table entry {t}: block offset 0x{off:x} is not cluster aligned"),
            ));
        }
        Ok(off)
    }

    fn block(&mut self, disk: &Disk, t: usize) -> Result<Option<u64>> {
        let off = self.block_offset(disk, t)?;
        if off == 0 {
            return Ok(None);
        }
        if !self.blocks.contains_key(&off) {
            let mut buf = vec![0u8; self.cluster_size() as usize];
            disk.read_meta(&mut buf, off, &format!("refcount block {t}"))?;
            self.blocks.insert(off, buf);
        }
        Ok(Some(off))
    }

    /// A copy of refcount block `t`; None where the table has no block.
    pub fn block_copy(&mut self, disk: &Disk, t: usize) -> Result<Option<Vec<u8>>> {
        Ok(self.block(disk, t)?.map(|off| self.blocks[&off].clone()))
    }

    pub fn get(&mut self, disk: &Disk, cluster: u64) -> Result<u64> {
        let per = self.per_block();
        match self.block(disk, (cluster / per) as usize)? {
            None => Ok(0),
            Some(off) => Ok(get_entry(&self.blocks[&off], self.order, cluster % per)),
        }
    }

    /// Sets a refcount, creating refcount blocks (and growing the table)
    /// as needed. The new value is on disk when this returns.
    pub fn set(&mut self, disk: &Disk, cluster: u64, value: u64) -> Result<()> {
        if value > self.max() {
            return Err(corrupt(
                &disk.path,
                format!(
                    "refcount of cluster {cluster} would exceed {} (refcount_bits too small)",
                    self.max()
                ),
            ));
        }
        let per = self.per_block();
        let t = (cluster / per) as usize;
        let off = match self.block(disk, t)? {
            Some(off) => off,
            None => self.new_block(disk, t)?,
        };
        let order = self.order;
        let block = self.blocks.get_mut(&off).expect("block was just loaded");
        let changed = set_entry(block, order, cluster % per, value);
        disk.write(&block[changed.clone()], off + changed.start as u64)?;
        if value == 0 {
            self.free_hint = self.free_hint.min(cluster);
        }
        Ok(())
    }

    pub fn adjust(&mut self, disk: &Disk, cluster: u64, delta: i64) -> Result<()> {
        let old = self.get(disk, cluster)?;
        let new = old.checked_add_signed(delta).ok_or_else(|| {
            corrupt(
                &disk.path,
                format!("refcount of cluster {cluster} is {old}, cannot add {delta}"),
            )
        })?;
        self.set(disk, cluster, new)
    }

    /// Sets the refcounts of `n` clusters from `start`, whose refcount
    /// blocks exist, with one write per block.
    fn set_run(&mut self, disk: &Disk, start: u64, n: u64, value: u64) -> Result<()> {
        let per = self.per_block();
        let order = self.order;
        let mut c = start;
        while c < start + n {
            let t = c / per;
            let end = (start + n).min((t + 1) * per);
            let Some(off) = self.block(disk, t as usize)? else {
                return Err(corrupt(
                    &disk.path,
                    format!("refcount block {t} vanished while allocating cluster {c}"),
                ));
            };
            let block = self.blocks.get_mut(&off).expect("block was just loaded");
            let first = set_entry(block, order, c % per, value);
            let last = set_entry(block, order, (end - 1) % per, value);
            for i in c + 1..end - 1 {
                set_entry(block, order, i % per, value);
            }
            let changed = first.start..last.end;
            disk.write(&block[changed.clone()], off + changed.start as u64)?;
            c = end;
        }
        Ok(())
    }

    /// Finds `n` contiguous free clusters at or after the hint.
    fn find_free(&mut self, disk: &Disk, n: u64) -> Result<u64> {
        let mut c = self.free_hint.max(1);
        let mut run = 0;
        loop {
            if self.get(disk, c)? == 0 {
                run += 1;
                if run == n {
                    return Ok(c + 1 - n);
                }
            } else {
                run = 0;
            }
            c += 1;
        }
    }

    /// Allocates `n` contiguous clusters with refcount 1; returns the first.
    pub fn alloc(&mut self, disk: &Disk, n: u64) -> Result<u64> {
        loop {
            let start = self.find_free(disk, n)?;
            let per = self.per_block();
            // Create the blocks that will count these clusters first: a new
            // block takes a free cluster, perhaps one of these.
            let mut created = false;
            for t in start / per..=(start + n - 1) / per {
                if self.block(disk, t as usize)?.is_none() {
                    self.new_block(disk, t as usize)?;
                    created = true;
                }
            }
            if created {
                continue;
            }
            self.set_run(disk, start, n, 1)?;
            self.free_hint = start + n;
            return Ok(start);
        }
    }

    /// Creates the refcount block for table index `t`, in a free cluster
    /// it counts itself where possible; returns its offset.
    fn new_block(&mut self, disk: &Disk, t: usize) -> Result<u64> {
        if t >= self.table.len() {
            self.grow(disk, t + 1)?;
            if let Some(off) = self.block(disk, t)? {
                return Ok(off);
            }
        }
        let per = self.per_block();
        loop {
            let c = self.find_free(disk, 1)?;
            let cs = self.cluster_size();
            let off = c * cs;
            let mut block = vec![0u8; cs as usize];
            if c / per == t as u64 {
                set_entry(&mut block, self.order, c % per, 1);
            } else {
                let home = (c / per) as usize;
                if self.block(disk, home)?.is_none() {
                    self.new_block(disk, home)?;
                    continue;
                }
                self.set(disk, c, 1)?;
            }
            disk.write(&block, off)?;
            self.blocks.insert(off, block);
            self.table[t] = off;
            disk.write(&off.to_be_bytes(), self.table_offset + t as u64 * 8)?;
            return Ok(off);
        }
    }

    /// Moves the table to the end of the image with room for `min` entries.
    /// The new table and the blocks counting it are written before the
    /// header points at them; the old table is freed last.
    fn grow(&mut self, disk: &Disk, min: usize) -> Result<()> {
        let cs = self.cluster_size();
        let per_cluster = (cs / 8) as usize;
        let per = self.per_block();
        let mut len = min.max(self.table.len() * 2).div_ceil(per_cluster) * per_cluster;
        let start = self.end_cluster(disk)?;
        let (tc, missing) = loop {
            let tc = (len * 8) as u64 / cs;
            let mut missing: Vec<u64> = Vec::new();
            loop {
                let end = start + tc + missing.len() as u64;
                let need: Vec<u64> = (start / per..=(end - 1) / per)
                    .filter(|&t| self.table.get(t as usize).is_none_or(|&e| e == 0))
                    .collect();
                if need.len() == missing.len() {
                    break;
                }
                missing = need;
            }
            let end = start + tc + missing.len() as u64;
            if ((end - 1) / per) < len as u64 {
                break (tc, missing);
            }
            len += per_cluster;
        };
        let old_offset = self.table_offset;
        let old_clusters = self.table_clusters();
        self.table.resize(len, 0);
        for (j, &t) in missing.iter().enumerate() {
            let off = (start + tc + j as u64) * cs;
            self.table[t as usize] = off;
            self.blocks.insert(off, vec![0u8; cs as usize]);
        }
        let end = start + tc + missing.len() as u64;
        let new_blocks: Vec<u64> = missing.iter().map(|&t| self.table[t as usize]).collect();
        for c in start..end {
            let t = (c / per) as usize;
            let off = self.table[t];
            if new_blocks.contains(&off) {
                let order = self.order;
                let block = self.blocks.get_mut(&off).expect("new block in cache");
                set_entry(block, order, c % per, 1);
            } else {
                self.set(disk, c, 1)?;
            }
        }
        for off in &new_blocks {
            disk.write(&self.blocks[off], *off)?;
        }
        let mut raw = Vec::with_capacity(len * 8);
        for e in &self.table {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        disk.write(&raw, start * cs)?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&(start * cs).to_be_bytes());
        hdr[8..].copy_from_slice(&(tc as u32).to_be_bytes());
        disk.write(&hdr, 48)?;
        self.table_offset = start * cs;
        for c in 0..old_clusters {
            self.set(disk, old_offset / cs + c, 0)?;
        }
        Ok(())
    }

    /// The first cluster past the file's end and every counted cluster.
    fn end_cluster(&mut self, disk: &Disk) -> Result<u64> {
        let file_end = disk.len()?.div_ceil(self.cluster_size());
        let per = self.per_block();
        let mut end = file_end;
        for t in (0..self.table.len()).rev() {
            if let Some(off) = self.block(disk, t)? {
                let order = self.order;
                let block = &self.blocks[&off];
                if let Some(i) = (0..per).rev().find(|&i| get_entry(block, order, i) != 0) {
                    end = end.max(t as u64 * per + i + 1);
                    break;
                }
            }
        }
        Ok(end)
    }

    /// Makes future allocations start at or after `cluster` (used while
    /// repairing, when refcounts cannot be trusted to find free space).
    pub fn set_floor(&mut self, cluster: u64) {
        self.free_hint = self.free_hint.max(cluster);
    }

    pub fn order(&self) -> u32 {
        self.order
    }
}
