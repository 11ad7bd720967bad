//! qcow2 (versions 2 and 3): reading, writing, backing chains, compressed
//! clusters, extended L2 entries and every refcount width.
//!
//! Locking: `state` is a read-write lock over the mapping metadata. Reads
//! and writes into clusters that are already allocated and owned (COPIED)
//! run under the shared lock, so they proceed in parallel with pread/pwrite;
//! anything that changes a mapping (allocation, copy-on-write, zeroing,
//! discard) takes the exclusive lock. Metadata is written through in crash
//! safe order: data, then refcounts, then L2 entries, then L1 entries; a
//! freed cluster's refcount drops only after nothing points to it.

pub mod check;
pub mod create;
pub mod header;
mod l2cache;
pub mod refcount;
pub mod snapshot;

use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::block::{self, Allocation, BlockDevice};
use crate::buf::AlignedBuf;
use crate::compress;
use crate::disk::{be64_at, Disk};
use crate::error::{corrupt, invalid, Error, Result};
use crate::image::Chain;
use crate::iobuf::{self, IoBuf};
use header::{Compression, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use l2cache::L2Cache;
use refcount::Refcounts;

/// Largest bounce buffer a vectored read uses at a time.
const BOUNCE: u64 = 1 << 20;

pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO: u64 = 1;
/// Extended L2: all 32 subclusters allocated.
const ALL_ALLOCATED: u64 = 0xffff_ffff;
/// Extended L2: all 32 subclusters read as zeroes.
const ALL_ZERO: u64 = 0xffff_ffff << 32;

pub struct Qcow2 {
    disk: Disk,
    read_only: bool,
    cluster_bits: u32,
    ext_l2: bool,
    compression: Compression,
    state: RwLock<State>,
    backing: Option<Box<dyn BlockDevice>>,
}

pub struct State {
    pub header: Header,
    pub l1: Vec<u64>,
    pub refs: Refcounts,
    l2_cache: L2Cache,
    /// Where the next compressed cluster may go (0: start a new cluster).
    compressed_end: u64,
}

/// How one cluster (or run of subclusters) is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Map {
    Unallocated,
    Zero,
    /// Host offset of the guest byte asked for.
    Data(u64),
    /// The raw L2 entry of a compressed cluster.
    Compressed(u64),
}

/// Where a guest cluster's L2 entry lives and what it holds.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    l1_copied: bool,
    l2_offset: u64,
    index: usize,
    pub entry: u64,
    pub bitmap: u64,
}

impl Qcow2 {
    /// Opens a qcow2 image; its backing chain is opened read-only through
    /// `chain`. Opening for writing repairs a dirty image's refcounts.
    pub(crate) fn open(path: &Path, read_only: bool, chain: &mut Chain) -> Result<Qcow2> {
        let disk = Disk::open(path, read_only, chain.is_direct())?;
        let file_len = disk.len()?;
        let mut first = vec![0u8; file_len.min(2 << 20) as usize];
        disk.read_meta(&mut first, 0, "header")?;
        let header = Header::parse(path, &first, file_len)?;
        if !read_only && header.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(corrupt(
                path,
                "the corrupt bit is set; the image can only be opened read-only",
            ));
        }
        let mut raw_l1 = vec![0u8; header.l1_size as usize * 8];
        disk.read_meta(&mut raw_l1, header.l1_table_offset, "L1 table")?;
        let l1 = (0..header.l1_size as usize)
            .map(|i| be64_at(&raw_l1, i * 8))
            .collect();
        let refs = Refcounts::load(
            &disk,
            header.refcount_order,
            header.cluster_bits,
            header.refcount_table_offset,
            header.refcount_table_clusters,
        )?;
        let backing = match &header.backing_file {
            Some(name) => chain.open_backing(path, name, header.backing_format.as_deref())?,
            None => None,
        };
        let q = Qcow2 {
            read_only,
            cluster_bits: header.cluster_bits,
            ext_l2: header.extended_l2(),
            compression: header.compression,
            backing,
            state: RwLock::new(State {
                l2_cache: L2Cache::new(1 << header.cluster_bits),
                header,
                l1,
                refs,
                compressed_end: 0,
            }),
            disk,
        };
        let incompatible = q.read().header.incompatible;
        if !read_only && incompatible & INCOMPAT_DIRTY != 0 {
            tracing::info!(path = %path.display(), "dirty image: rebuilding refcounts");
            check::check(&q, Some(check::Repair::All))?;
            q.set_incompatible(incompatible & !INCOMPAT_DIRTY)?;
        }
        Ok(q)
    }

    pub fn path(&self) -> &Path {
        &self.disk.path
    }

    pub(crate) fn disk(&self) -> &Disk {
        &self.disk
    }

    pub fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn write_lock(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn header(&self) -> Header {
        self.read().header.clone()
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entry_size(&self) -> u64 {
        if self.ext_l2 {
            16
        } else {
            8
        }
    }

    /// log2 of the entries per L2 table.
    fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.ext_l2 { 4 } else { 3 }
    }

    fn l2_coverage(&self) -> u64 {
        1 << (self.l2_bits() + self.cluster_bits)
    }

    pub(crate) fn set_incompatible(&self, bits: u64) -> Result<()> {
        let mut st = self.write_lock();
        st.header.incompatible = bits;
        if st.header.version >= 3 {
            self.disk.write(&bits.to_be_bytes(), 72)?;
            self.disk.sync()?;
        }
        Ok(())
    }

    /// Reads an L2 table through the cache and passes it to `f`.
    pub(crate) fn with_l2<T>(
        &self,
        st: &State,
        offset: u64,
        f: impl FnOnce(&[u64]) -> T,
    ) -> Result<T> {
        st.l2_cache.with(offset, || self.load_l2(offset), f)
    }

    fn load_l2(&self, offset: u64) -> Result<Box<[u64]>> {
        if !offset.is_multiple_of(self.cluster_size()) {
            return Err(corrupt(
                &self.disk.path,
                format!("L2 table offset 0x{offset:x} is not cluster aligned"),
            ));
        }
        let mut raw = AlignedBuf::page(self.cluster_size() as usize);
        self.disk.read_meta(&mut raw, offset, "L2 table")?;
        Ok(raw.chunks(8).map(|c| be64_at(c, 0)).collect())
    }

    /// Runs `f` under the shared lock. L2 tables it loaded then move into
    /// the cache proper, where later reads find them without a lock, if no
    /// one else holds the lock at that moment.
    fn shared<T>(&self, f: impl FnOnce(&State) -> Result<T>) -> Result<T> {
        let (result, loaded) = {
            let st = self.read();
            (f(&st), st.l2_cache.pending())
        };
        if loaded {
            if let Ok(mut st) = self.state.try_write() {
                st.l2_cache.settle();
            }
        }
        result
    }

    fn slot(&self, st: &State, guest: u64) -> Result<Slot> {
        let l1_index = (guest >> (self.l2_bits() + self.cluster_bits)) as usize;
        let l1e = *st.l1.get(l1_index).ok_or_else(|| {
            corrupt(
                &self.disk.path,
                format!(
                    "guest offset {guest} is beyond the L1 table ({} entries)",
                    st.l1.len()
                ),
            )
        })?;
        let l2_offset = l1e & OFFSET_MASK;
        let index = ((guest >> self.cluster_bits) & ((1 << self.l2_bits()) - 1)) as usize;
        let mut slot = Slot {
            l1_copied: l1e & COPIED != 0,
            l2_offset,
            index,
            entry: 0,
            bitmap: 0,
        };
        if l2_offset != 0 {
            let words = if self.ext_l2 { 2 } else { 1 };
            (slot.entry, slot.bitmap) = self.with_l2(st, l2_offset, |t| {
                (
                    t[index * words],
                    if self.ext_l2 { t[index * words + 1] } else { 0 },
                )
            })?;
        }
        Ok(slot)
    }

    /// How `len` bytes at `guest` are stored: the answer and for how many
    /// bytes it holds (never past the cluster's end).
    pub fn map(&self, st: &State, guest: u64, len: u64) -> Result<(Map, u64)> {
        let slot = self.slot(st, guest)?;
        let cs = self.cluster_size();
        let in_cl = guest % cs;
        let max = len.min(cs - in_cl);
        let e = slot.entry;
        if e & COMPRESSED != 0 {
            return Ok((Map::Compressed(e), max));
        }
        let host = e & OFFSET_MASK;
        if !host.is_multiple_of(cs) {
            return Err(corrupt(&self.disk.path, format!("L2 entry for guest offset {guest}: data offset 0x{host:x} is not cluster aligned")));
        }
        if !self.ext_l2 {
            let map = if e & ZERO != 0 && st.header.version >= 3 {
                Map::Zero
            } else if host == 0 {
                Map::Unallocated
            } else {
                Map::Data(host + in_cl)
            };
            return Ok((map, max));
        }
        let sc_bits = self.cluster_bits - 5;
        let status = |i: u64| (slot.bitmap >> i & 1, slot.bitmap >> (32 + i) & 1);
        let first = in_cl >> sc_bits;
        let kind = status(first);
        let mut end = first + 1;
        while end < 32 && status(end) == kind {
            end += 1;
        }
        let n = max.min((end << sc_bits) - in_cl);
        let map = match kind {
            (1, 0) if host != 0 => Map::Data(host + in_cl),
            (1, 0) => {
                return Err(corrupt(
                    &self.disk.path,
                    format!(
                    "L2 entry for guest offset {guest}: subcluster allocated without a host offset"
                ),
                ))
            }
            (0, 1) => Map::Zero,
            (0, 0) => Map::Unallocated,
            _ => {
                return Err(corrupt(
                    &self.disk.path,
                    format!(
                        "L2 bitmap for guest offset {guest}: subcluster both allocated and zero"
                    ),
                ))
            }
        };
        Ok((map, n))
    }

    pub(crate) fn compressed_range(&self, entry: u64) -> (u64, u64) {
        let x = 62 - (self.cluster_bits - 8);
        let offset = entry & ((1 << x) - 1);
        let sectors = ((entry >> x) & ((1 << (self.cluster_bits - 8)) - 1)) + 1;
        (offset, sectors * 512 - (offset & 511))
    }

    fn read_compressed(&self, entry: u64) -> Result<Vec<u8>> {
        let (offset, len) = self.compressed_range(entry);
        let mut raw = vec![0u8; len as usize];
        self.disk.read_data(&mut raw, offset)?;
        let mut out = vec![0u8; self.cluster_size() as usize];
        compress::decompress(self.compression, &raw, &mut out).map_err(|e| {
            corrupt(
                &self.disk.path,
                format!("compressed cluster at 0x{offset:x}: {e}"),
            )
        })?;
        Ok(out)
    }

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let avail = b.size().saturating_sub(offset).min(buf.len() as u64) as usize;
        if avail > 0 {
            b.read_at(&mut buf[..avail], offset)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn read_locked(&self, st: &State, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let g = offset + done as u64;
            let (map, n) = self.map(st, g, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + n as usize];
            match map {
                Map::Unallocated => self.read_backing(chunk, g)?,
                Map::Zero => chunk.fill(0),
                Map::Data(host) => {
                    let run = self.data_run(st, host, g, n, (buf.len() - done) as u64)?;
                    self.disk
                        .read_data(&mut buf[done..done + run as usize], host)?;
                    done += run as usize;
                    continue;
                }
                Map::Compressed(e) => {
                    let cl = self.read_compressed(e)?;
                    let at = (g % self.cluster_size()) as usize;
                    chunk.copy_from_slice(&cl[at..at + chunk.len()]);
                }
            }
            done += n as usize;
        }
        Ok(())
    }

    /// How many of the `len` bytes at `guest` (the first `n` of them
    /// stored at `host`) are stored contiguously from `host`, so that one
    /// pread serves a run of clusters.
    fn data_run(&self, st: &State, host: u64, guest: u64, n: u64, len: u64) -> Result<u64> {
        let mut run = n;
        while run < len {
            let (map, m) = self.map(st, guest + run, len - run)?;
            if map != Map::Data(host + run) {
                break;
            }
            run += m;
        }
        Ok(run)
    }

    fn check_range(&self, st: &State, offset: u64, len: u64) -> Result<()> {
        let size = st.header.size;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange {
                path: self.disk.path.clone(),
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                path: self.disk.path.clone(),
            });
        }
        Ok(())
    }

    fn in_place(&self, slot: &Slot, in_cl: u64, n: u64) -> bool {
        let e = slot.entry;
        if slot.l2_offset == 0
            || !slot.l1_copied
            || e & COPIED == 0
            || e & COMPRESSED != 0
            || e & OFFSET_MASK == 0
        {
            return false;
        }
        if !self.ext_l2 {
            return e & ZERO == 0;
        }
        let sc_bits = self.cluster_bits - 5;
        ((in_cl >> sc_bits)..=((in_cl + n - 1) >> sc_bits)).all(|i| slot.bitmap >> i & 1 == 1)
    }

    /// Writes into owned allocated clusters only; false (and nothing
    /// written) if any part of the range needs a mapping change.
    fn write_in_place(&self, st: &State, buf: &[u8], offset: u64) -> Result<bool> {
        let Some(plan) = self.in_place_plan(st, offset, buf.len() as u64)? else {
            return Ok(false);
        };
        for (host, at, len) in plan {
            self.disk
                .write(&buf[at as usize..(at + len) as usize], host)?;
        }
        Ok(true)
    }

    /// Where `len` guest bytes at `offset` lie in owned allocated clusters,
    /// as (host offset, offset into the range, length) runs; None if any
    /// part of the range needs a mapping change.
    fn in_place_plan(
        &self,
        st: &State,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<(u64, u64, u64)>>> {
        let cs = self.cluster_size();
        let mut plan: Vec<(u64, u64, u64)> = Vec::new();
        let mut done = 0u64;
        while done < len {
            let g = offset + done;
            let in_cl = g % cs;
            let n = (len - done).min(cs - in_cl);
            let slot = self.slot(st, g)?;
            if !self.in_place(&slot, in_cl, n) {
                return Ok(None);
            }
            let host = (slot.entry & OFFSET_MASK) + in_cl;
            match plan.last_mut() {
                Some((h, _, run)) if *h + *run == host => *run += n,
                _ => plan.push((host, done, n)),
            }
            done += n;
        }
        Ok(Some(plan))
    }

    /// `read_vectored_at` under the read lock: data runs go straight into
    /// `bufs`, everything else (backing file, zeroes, compressed clusters,
    /// O_DIRECT misalignment) through a bounce buffer.
    fn read_vectored_locked(&self, st: &State, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        let total = iobuf::total_len(bufs);
        let mut done = 0u64;
        while done < total {
            let g = offset + done;
            let (map, n) = self.map(st, g, total - done)?;
            if let Map::Data(host) = map {
                let run = self.data_run(st, host, g, n, total - done)?;
                if self
                    .disk
                    .read_vectored(&iobuf::sub_range(bufs, done, done + run), host)?
                {
                    done += run;
                    continue;
                }
            }
            let mut bounce = vec![0u8; n.min(BOUNCE) as usize];
            self.read_locked(st, &mut bounce, g)?;
            iobuf::scatter(bufs, done, &bounce);
            done += bounce.len() as u64;
        }
        Ok(())
    }

    /// `block_status` under the shared lock.
    fn status_locked(&self, st: &State, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        self.check_range(st, offset, len)?;
        let (first, mut n) = self.map(st, offset, len)?;
        let kind = |m: Map| match m {
            Map::Unallocated => Allocation::Unallocated,
            Map::Zero => Allocation::Zero,
            Map::Data(h) => Allocation::Data {
                host: Some(h),
                compressed: false,
            },
            Map::Compressed(_) => Allocation::Data {
                host: None,
                compressed: true,
            },
        };
        // Extend over following clusters of the same kind (contiguous data).
        while n < len {
            let (next, m) = self.map(st, offset + n, len - n)?;
            let same = match (first, next) {
                (Map::Data(a), Map::Data(b)) => b == a + n,
                (Map::Compressed(_), Map::Compressed(_)) => true,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            n += m;
        }
        Ok((kind(first), n))
    }

    /// Makes the L2 table for `guest` exist and be owned by the active L1
    /// (allocating or copying it), and returns the guest cluster's slot.
    fn slot_for_write(&self, st: &mut State, guest: u64) -> Result<Slot> {
        let l1_index = (guest / self.l2_coverage()) as usize;
        let l1e = st.l1[l1_index];
        let old = l1e & OFFSET_MASK;
        if old == 0 || l1e & COPIED == 0 {
            let cs = self.cluster_size();
            let table = if old == 0 {
                vec![0u64; (cs / 8) as usize]
            } else {
                self.with_l2(st, old, |t| t.to_vec())?
            };
            let new = st.refs.alloc(&self.disk, 1)? * cs;
            let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.disk.write(&raw, new)?;
            st.l2_cache.insert(new, table.into_boxed_slice());
            st.l1[l1_index] = new | COPIED;
            self.disk.write(
                &(new | COPIED).to_be_bytes(),
                st.header.l1_table_offset + l1_index as u64 * 8,
            )?;
            if old != 0 {
                st.refs.adjust(&self.disk, old / cs, -1)?;
            }
        }
        self.slot(st, guest)
    }

    fn set_slot(&self, st: &mut State, slot: &Slot, entry: u64, bitmap: u64) -> Result<()> {
        self.set_slots(st, slot.l2_offset, slot.index, &[(entry, bitmap)])
    }

    /// Sets consecutive L2 entries (entry, extended-L2 bitmap) from `first`
    /// with one write.
    fn set_slots(
        &self,
        st: &mut State,
        l2_offset: u64,
        first: usize,
        entries: &[(u64, u64)],
    ) -> Result<()> {
        let words = if self.ext_l2 { 2 } else { 1 };
        let table = self.l2_mut(st, l2_offset)?;
        let mut raw = Vec::with_capacity(entries.len() * words * 8);
        for (i, &(entry, bitmap)) in entries.iter().enumerate() {
            let at = (first + i) * words;
            table[at] = entry;
            raw.extend_from_slice(&entry.to_be_bytes());
            if self.ext_l2 {
                table[at + 1] = bitmap;
                raw.extend_from_slice(&bitmap.to_be_bytes());
            }
        }
        self.disk
            .write(&raw, l2_offset + first as u64 * self.l2_entry_size())
    }

    /// The cached L2 table at `offset` (read if it is not), to change
    /// along with the file.
    pub(crate) fn l2_mut<'a>(&self, st: &'a mut State, offset: u64) -> Result<&'a mut [u64]> {
        if st.l2_cache.get_mut(offset).is_none() {
            let table = self.load_l2(offset)?;
            st.l2_cache.insert(offset, table);
        }
        Ok(st
            .l2_cache
            .get_mut(offset)
            .expect("L2 table cached just above"))
    }

    /// Drops this image's reference to what an old L2 entry pointed at.
    fn release(&self, st: &mut State, entry: u64) -> Result<()> {
        let cs = self.cluster_size();
        if entry & COMPRESSED != 0 {
            let (offset, len) = self.compressed_range(entry);
            for c in offset / cs..=(offset + len - 1) / cs {
                st.refs.adjust(&self.disk, c, -1)?;
            }
        } else if entry & OFFSET_MASK != 0 {
            st.refs.adjust(&self.disk, (entry & OFFSET_MASK) / cs, -1)?;
        }
        Ok(())
    }

    /// Writes one cluster's worth (or less) where the mapping must change:
    /// the whole cluster is rebuilt (old contents, backing data or zeroes,
    /// with `data` laid over) and written to an owned cluster.
    fn write_cluster(&self, st: &mut State, data: &[u8], guest: u64) -> Result<()> {
        let cs = self.cluster_size();
        let in_cl = guest % cs;
        let slot = self.slot_for_write(st, guest)?;
        if self.in_place(&slot, in_cl, data.len() as u64) {
            return self.disk.write(data, (slot.entry & OFFSET_MASK) + in_cl);
        }
        if self.ext_l2 && self.write_subclusters(st, &slot, data, guest)? {
            return Ok(());
        }
        let start = guest - in_cl;
        let mut cluster = vec![0u8; cs as usize];
        if (data.len() as u64) < cs {
            let valid = (st.header.size - start).min(cs) as usize;
            self.read_locked(st, &mut cluster[..valid], start)?;
        }
        cluster[in_cl as usize..in_cl as usize + data.len()].copy_from_slice(data);
        let e = slot.entry;
        let owned = owned(e);
        let host = if owned {
            e & OFFSET_MASK
        } else {
            st.refs.alloc(&self.disk, 1)? * cs
        };
        self.disk.write(&cluster, host)?;
        let bitmap = if self.ext_l2 { ALL_ALLOCATED } else { 0 };
        self.set_slot(st, &slot, host | COPIED, bitmap)?;
        if !owned {
            self.release(st, e)?;
        }
        Ok(())
    }

    /// Extended L2: writes only the subclusters `data` touches (their
    /// untouched edges filled from what they read as now), allocating the
    /// host cluster if there is none; the other subclusters keep their
    /// state, so unallocated ones still read from the backing file. False
    /// (nothing written) where the whole cluster must be rebuilt: it is
    /// compressed or shared with a snapshot.
    fn write_subclusters(
        &self,
        st: &mut State,
        slot: &Slot,
        data: &[u8],
        guest: u64,
    ) -> Result<bool> {
        let e = slot.entry;
        let old_host = e & OFFSET_MASK;
        if e & COMPRESSED != 0 || (old_host != 0 && !owned(e)) {
            return Ok(false);
        }
        let cs = self.cluster_size();
        let sc = cs / 32;
        let in_cl = guest % cs;
        let cluster = guest - in_cl;
        let (first, last) = (in_cl / sc, (in_cl + data.len() as u64 - 1) / sc);
        let start = first * sc;
        let end = ((last + 1) * sc).min(st.header.size - cluster);
        let mut buf = vec![0u8; (end - start) as usize];
        if in_cl > start || in_cl + (data.len() as u64) < end {
            self.read_locked(st, &mut buf, cluster + start)?;
        }
        let at = (in_cl - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        let host = if old_host != 0 {
            old_host
        } else {
            st.refs.alloc(&self.disk, 1)? * cs
        };
        self.disk.write(&buf, host + start)?;
        let touched = ((1u64 << (last - first + 1)) - 1) << first;
        let bitmap = (slot.bitmap | touched) & !(touched << 32);
        self.set_slot(st, slot, host | COPIED, bitmap)?;
        Ok(true)
    }

    fn write_locked(&self, st: &mut State, buf: &[u8], offset: u64) -> Result<()> {
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let g = offset + done as u64;
            if g.is_multiple_of(cs) && (buf.len() - done) as u64 >= cs {
                let n = self.write_new_clusters(st, &buf[done..], g)?;
                if n > 0 {
                    done += n;
                    continue;
                }
            }
            let n = ((buf.len() - done) as u64).min(cs - g % cs) as usize;
            self.write_cluster(st, &buf[done..done + n], g)?;
            done += n;
        }
        Ok(())
    }

    /// Writes whole clusters from `guest` (cluster aligned) that all need
    /// a new host cluster, as one run: one allocation, one data write, one
    /// L2 write. Returns the bytes written (0: the first cluster is owned
    /// already, or `data` holds no whole cluster).
    fn write_new_clusters(&self, st: &mut State, data: &[u8], guest: u64) -> Result<usize> {
        let cs = self.cluster_size();
        let slot = self.slot_for_write(st, guest)?;
        let per_table = (cs / self.l2_entry_size()) as usize;
        let max = (data.len() / cs as usize).min(per_table - slot.index);
        let words = if self.ext_l2 { 2 } else { 1 };
        let old: Vec<u64> = self.with_l2(st, slot.l2_offset, |t| {
            (slot.index..slot.index + max)
                .map(|i| t[i * words])
                .take_while(|&e| !owned(e))
                .collect()
        })?;
        if old.is_empty() {
            return Ok(0);
        }
        let n = old.len();
        let host = st.refs.alloc(&self.disk, n as u64)? * cs;
        self.disk.write(&data[..n * cs as usize], host)?;
        let bitmap = if self.ext_l2 { ALL_ALLOCATED } else { 0 };
        let entries: Vec<(u64, u64)> = (0..n as u64)
            .map(|i| ((host + i * cs) | COPIED, bitmap))
            .collect();
        self.set_slots(st, slot.l2_offset, slot.index, &entries)?;
        for e in old {
            self.release(st, e)?;
        }
        Ok(n * cs as usize)
    }

    /// Calls `f` with each cluster-sized piece of a range: (guest offset,
    /// length, whether the piece is a whole cluster of the image).
    fn for_clusters(
        &self,
        st: &mut State,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&Self, &mut State, u64, u64, bool) -> Result<()>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let end = offset + len;
        let mut g = offset;
        while g < end {
            let n = (end - g).min(cs - g % cs);
            let whole = g.is_multiple_of(cs) && (n == cs || g + n == st.header.size);
            f(self, st, g, n, whole)?;
            g += n;
        }
        Ok(())
    }

    /// Points a whole cluster's L2 entry at zeroes (or at nothing, where
    /// nothing reads as zeroes) and releases what it held.
    fn unmap_cluster(&self, st: &mut State, guest: u64, zero: bool) -> Result<()> {
        let slot = self.slot(st, guest)?;
        if slot.l2_offset == 0 && !zero {
            return Ok(());
        }
        let slot = self.slot_for_write(st, guest)?;
        let (entry, bitmap) = match (zero, self.ext_l2) {
            (false, _) => (0, 0),
            (true, false) => (ZERO, 0),
            (true, true) => (0, ALL_ZERO),
        };
        if (slot.entry, slot.bitmap) == (entry, bitmap) {
            return Ok(());
        }
        self.set_slot(st, &slot, entry, bitmap)?;
        self.release(st, slot.entry)
    }

    /// Stores an already compressed cluster at guest cluster `guest`
    /// (which must be cluster aligned). Compressed data of several clusters
    /// share host clusters, as QEMU packs them.
    pub fn write_compressed(&self, guest: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        let cs = self.cluster_size();
        let mut st = self.write_lock();
        self.check_range(&st, guest, 1)?;
        let slot = self.slot_for_write(&mut st, guest)?;
        let len = data.len() as u64;
        let end = st.compressed_end;
        let shared = !end.is_multiple_of(cs)
            && end % cs + len <= cs
            && st.refs.get(&self.disk, end / cs)? < st.refs.max();
        let offset = if shared {
            st.refs.adjust(&self.disk, end / cs, 1)?;
            end
        } else {
            st.refs.alloc(&self.disk, len.div_ceil(cs))? * cs
        };
        self.disk.write(data, offset)?;
        st.compressed_end = offset + len;
        let x = 62 - (self.cluster_bits - 8);
        let sectors = ((offset & 511) + len).div_ceil(512);
        let entry = COMPRESSED | ((sectors - 1) << x) | offset;
        self.set_slot(&mut st, &slot, entry, 0)?;
        self.release(&mut st, slot.entry)
    }

    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Allocates every cluster of the image (preallocation=metadata and
    /// up); returns the host ranges allocated, for falloc/full to fill.
    pub fn preallocate(&self) -> Result<Vec<(u64, u64)>> {
        self.check_writable()?;
        let cs = self.cluster_size();
        let mut st = self.write_lock();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let size = st.header.size;
        let per_table = self.l2_coverage();
        let mut g = 0;
        while g < size {
            let n = (size - g).min(per_table).div_ceil(cs);
            self.slot_for_write(&mut st, g)?;
            let first = st.refs.alloc(&self.disk, n)? * cs;
            ranges.push((first, n * cs));
            for i in 0..n {
                let slot = self.slot(&st, g + i * cs)?;
                let bitmap = if self.ext_l2 { ALL_ALLOCATED } else { 0 };
                self.set_slot(&mut st, &slot, (first + i * cs) | COPIED, bitmap)?;
            }
            g += n * cs;
        }
        Ok(ranges)
    }
}

impl Qcow2 {
    /// Changes the virtual size. Growing may move the L1 table (new table
    /// first, then the header, then the old table is freed); shrinking
    /// frees the clusters past the new end.
    pub fn resize(&self, size: u64) -> Result<()> {
        self.check_writable()?;
        validate_size(&self.disk.path, size)?;
        let cs = self.cluster_size();
        let mut st = self.write_lock();
        let old = st.header.size;
        if size < old {
            if st.header.nb_snapshots > 0 {
                return Err(Error::Unsupported {
                    path: self.disk.path.clone(),
                    what: "shrinking an image that has internal snapshots".into(),
                });
            }
            let mut g = size.div_ceil(cs) * cs;
            while g < old {
                self.unmap_cluster(&mut st, g, false)?;
                g += cs;
            }
        }
        let needed = st.header.l1_entries_for(size) as usize;
        if needed > st.l1.len() {
            self.grow_l1(&mut st, needed)?;
        }
        self.disk.write(&size.to_be_bytes(), 24)?;
        st.header.size = size;
        self.disk.sync()
    }

    /// Drops every cluster this image holds, so that it reads entirely
    /// from its backing file again (`qemu-img commit` without -d).
    pub fn make_empty(&self) -> Result<()> {
        self.check_writable()?;
        let cs = self.cluster_size();
        let mut st = self.write_lock();
        let mut g = 0;
        while g < st.header.size {
            self.unmap_cluster(&mut st, g, false)?;
            g += cs;
        }
        self.disk.sync()
    }

    /// Rewrites the header with a new backing file name and format (None
    /// removes the backing file). Unknown header extensions are dropped,
    /// so the autoclear bits that promise them are cleared.
    pub fn set_backing(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.check_writable()?;
        let mut st = self.write_lock();
        let mut h = st.header.clone();
        h.backing_file = name.map(str::to_string);
        h.backing_format = name.and(format).map(str::to_string);
        h.refcount_table_offset = st.refs.table_offset;
        h.refcount_table_clusters = st.refs.table_clusters() as u32;
        h.autoclear = 0;
        let raw = h
            .encode()
            .map_err(|m| Error::Usage(format!("{}: {m}", self.disk.path.display())))?;
        // The first cluster holds nothing but the header: clear the rest of it.
        let mut cluster = vec![0u8; self.cluster_size() as usize];
        cluster[..raw.len()].copy_from_slice(&raw);
        self.disk.write(&cluster, 0)?;
        st.header = h;
        self.disk.sync()
    }

    fn grow_l1(&self, st: &mut State, entries: usize) -> Result<()> {
        let cs = self.cluster_size();
        let old_offset = st.header.l1_table_offset;
        let old_clusters = (st.l1.len() as u64 * 8).div_ceil(cs);
        let clusters = (entries as u64 * 8).div_ceil(cs);
        let new = st.refs.alloc(&self.disk, clusters)? * cs;
        let mut l1 = st.l1.clone();
        l1.resize(entries, 0);
        let mut raw: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        raw.resize((clusters * cs) as usize, 0);
        self.disk.write(&raw, new)?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&new.to_be_bytes());
        self.disk.write(&hdr, 36)?;
        st.l1 = l1;
        st.header.l1_size = entries as u32;
        st.header.l1_table_offset = new;
        if old_offset != 0 {
            for c in 0..old_clusters {
                st.refs.adjust(&self.disk, old_offset / cs + c, -1)?;
            }
        }
        Ok(())
    }
}

impl BlockDevice for Qcow2 {
    fn size(&self) -> u64 {
        self.read().header.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.shared(|st| {
            self.check_range(st, offset, buf.len() as u64)?;
            self.read_locked(st, buf, offset)
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let in_place = self.shared(|st| {
            self.check_range(st, offset, buf.len() as u64)?;
            self.write_in_place(st, buf, offset)
        })?;
        if in_place {
            return Ok(());
        }
        let mut st = self.write_lock();
        self.write_locked(&mut st, buf, offset)
    }

    fn read_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        self.shared(|st| {
            self.check_range(st, offset, iobuf::total_len(bufs))?;
            self.read_vectored_locked(st, bufs, offset)
        })
    }

    /// Straight from `bufs` where every cluster is allocated and owned
    /// (and O_DIRECT takes the buffers), else through `write_at`.
    fn write_vectored_at(&self, bufs: &[IoBuf<'_>], offset: u64) -> Result<()> {
        self.check_writable()?;
        let total = iobuf::total_len(bufs);
        let written = self.shared(|st| {
            self.check_range(st, offset, total)?;
            let Some(plan) = self.in_place_plan(st, offset, total)? else {
                return Ok(false);
            };
            let direct = plan.iter().all(|&(host, at, len)| {
                self.disk
                    .vectored_fits(&iobuf::sub_range(bufs, at, at + len), host)
            });
            if direct {
                for (host, at, len) in plan {
                    self.disk
                        .write_vectored(&iobuf::sub_range(bufs, at, at + len), host)?;
                }
            }
            Ok(direct)
        })?;
        if written {
            return Ok(());
        }
        block::write_bounced(self, bufs, offset)
    }

    fn flush(&self) -> Result<()> {
        self.disk.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let mut st = self.write_lock();
        self.check_range(&st, offset, len)?;
        let v3 = st.header.version >= 3;
        let backed = self.backing.is_some();
        self.for_clusters(&mut st, offset, len, |q, st, g, _, whole| {
            if !whole || (backed && !v3) {
                return Ok(());
            }
            q.unmap_cluster(st, g, backed)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let mut st = self.write_lock();
        self.check_range(&st, offset, len)?;
        let v3 = st.header.version >= 3;
        let backed = self.backing.is_some();
        self.for_clusters(&mut st, offset, len, |q, st, g, n, whole| {
            if whole && (v3 || !backed) {
                q.unmap_cluster(st, g, backed || v3)
            } else {
                q.write_locked(st, &vec![0u8; n as usize], g)
            }
        })
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        self.shared(|st| self.status_locked(st, offset, len))
    }

    fn backing(&self) -> Option<&dyn BlockDevice> {
        self.backing.as_deref()
    }
}

/// Whether an L2 entry points at a data cluster this image alone holds
/// (so it may be written in place).
fn owned(entry: u64) -> bool {
    entry & COPIED != 0 && entry & COMPRESSED == 0 && entry & OFFSET_MASK != 0
}

/// Checks that a create or resize size fits the format.
pub fn validate_size(path: &Path, size: u64) -> Result<()> {
    if size > (1u64 << 61) {
        return Err(invalid(
            path,
            "size",
            format!("{size} bytes is too large for qcow2"),
        ));
    }
    Ok(())
}
