//! The qcow2 internal snapshot table.

use std::path::Path;

use crate::disk::{be64_at, Disk};
use crate::error::{invalid, Result};

/// Largest extra data per snapshot entry QEMU accepts.
const MAX_EXTRA: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: Option<u64>,
    pub icount: Option<u64>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// Reads `count` snapshot entries at `offset`; also returns the table's
/// length in bytes.
pub fn read_table(
    disk: &Disk,
    offset: u64,
    count: u32,
    cluster_size: u64,
) -> Result<(Vec<Snapshot>, u64)> {
    let path: &Path = &disk.path;
    let mut snaps = Vec::with_capacity(count as usize);
    let mut at = offset;
    for i in 0..count {
        let mut fixed = [0u8; 40];
        disk.read_meta(&mut fixed, at, &format!("snapshot {i} header"))?;
        let extra_len = be32(&fixed, 36) as usize;
        if extra_len > MAX_EXTRA {
            return Err(invalid(
                path,
                &format!("snapshot {i} extra_data_size"),
                format!("{extra_len} (at most {MAX_EXTRA})"),
            ));
        }
        let id_len = be16(&fixed, 12);
        let name_len = be16(&fixed, 14);
        let mut rest = vec![0u8; extra_len + id_len + name_len];
        disk.read_meta(&mut rest, at + 40, &format!("snapshot {i} names"))?;
        let l1_table_offset = be64_at(&fixed, 0);
        if !l1_table_offset.is_multiple_of(cluster_size) {
            return Err(invalid(
                path,
                &format!("snapshot {i} l1_table_offset"),
                format!("0x{l1_table_offset:x} is not cluster aligned"),
            ));
        }
        let extra = &rest[..extra_len];
        let text = |r: std::ops::Range<usize>| String::from_utf8_lossy(&rest[r]).into_owned();
        snaps.push(Snapshot {
            l1_table_offset,
            l1_size: be32(&fixed, 8),
            id: text(extra_len..extra_len + id_len),
            name: text(extra_len + id_len..extra_len + id_len + name_len),
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64_at(&fixed, 24),
            vm_state_size: extra
                .get(..8)
                .map_or(u64::from(be32(&fixed, 32)), |_| be64_at(extra, 0)),
            disk_size: extra.get(8..16).map(|_| be64_at(extra, 8)),
            icount: extra.get(16..24).map(|_| be64_at(extra, 16)),
        });
        at += (40 + rest.len()).div_ceil(8) as u64 * 8;
    }
    Ok((snaps, at - offset))
}

/// Encodes a snapshot table as QEMU writes it (24 bytes of extra data).
pub fn encode_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in snaps {
        b.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&s.l1_size.to_be_bytes());
        b.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&s.date_sec.to_be_bytes());
        b.extend_from_slice(&s.date_nsec.to_be_bytes());
        b.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&(s.vm_state_size.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        b.extend_from_slice(&24u32.to_be_bytes());
        b.extend_from_slice(&s.vm_state_size.to_be_bytes());
        b.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
        b.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
        b.extend_from_slice(s.id.as_bytes());
        b.extend_from_slice(s.name.as_bytes());
        b.resize(b.len().div_ceil(8) * 8, 0);
    }
    b
}

use super::{Qcow2, State, COMPRESSED, COPIED, OFFSET_MASK};
use crate::error::Error;

impl Qcow2 {
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let st = self.read();
        let h = &st.header;
        Ok(read_table(
            self.disk(),
            h.snapshots_offset,
            h.nb_snapshots,
            h.cluster_size(),
        )?
        .0)
    }

    /// Adds `addend` to the refcount of every L2 table and data cluster an
    /// L1 table references (once per reference, as `check` counts them).
    fn add_references(&self, st: &mut State, l1: &[u64], addend: i64) -> Result<()> {
        let cs = self.cluster_size();
        let words = if self.ext_l2 { 2 } else { 1 };
        for &e in l1 {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let table = self.with_l2(st, l2, |t| t.to_vec())?;
            for entry in table.iter().step_by(words) {
                if entry & COMPRESSED != 0 {
                    let (off, len) = self.compressed_range(*entry);
                    for c in off / cs..=(off + len - 1) / cs {
                        st.refs.adjust(self.disk(), c, addend)?;
                    }
                } else if entry & OFFSET_MASK != 0 {
                    st.refs
                        .adjust(self.disk(), (entry & OFFSET_MASK) / cs, addend)?;
                }
            }
            st.refs.adjust(self.disk(), l2 / cs, addend)?;
        }
        Ok(())
    }

    /// Sets COPIED on active L1/L2 entries exactly where the refcount is 1.
    fn fix_copied(&self, st: &mut State) -> Result<()> {
        let cs = self.cluster_size();
        let words = if self.ext_l2 { 2 } else { 1 };
        for i in 0..st.l1.len() {
            let e = st.l1[i];
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let owned = st.refs.get(self.disk(), l2 / cs)? == 1;
            let mut table = self.with_l2(st, l2, |t| t.to_vec())?;
            let mut changed = false;
            for entry in table.iter_mut().step_by(words) {
                if *entry & COMPRESSED != 0 || *entry & OFFSET_MASK == 0 {
                    continue;
                }
                let one = st.refs.get(self.disk(), (*entry & OFFSET_MASK) / cs)? == 1;
                let want = if one {
                    *entry | COPIED
                } else {
                    *entry & !COPIED
                };
                changed |= want != *entry;
                *entry = want;
            }
            if changed {
                let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
                self.disk().write(&raw, l2)?;
                st.l2_cache.insert(l2, table.into_boxed_slice());
            }
            let want = if owned { e | COPIED } else { e & !COPIED };
            if want != e {
                st.l1[i] = want;
                self.disk().write(
                    &want.to_be_bytes(),
                    st.header.l1_table_offset + i as u64 * 8,
                )?;
            }
        }
        Ok(())
    }

    /// Writes a new snapshot table, points the header at it, frees the old.
    fn write_table(&self, st: &mut State, snaps: &[Snapshot]) -> Result<()> {
        let cs = self.cluster_size();
        let raw = encode_table(snaps);
        let new = if raw.is_empty() {
            0
        } else {
            let off = st
                .refs
                .alloc(self.disk(), (raw.len() as u64).div_ceil(cs))?
                * cs;
            self.disk().write(&raw, off)?;
            off
        };
        let (_, old_len) = read_table(
            self.disk(),
            st.header.snapshots_offset,
            st.header.nb_snapshots,
            cs,
        )?;
        let old = st.header.snapshots_offset;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(snaps.len() as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&new.to_be_bytes());
        self.disk().write(&hdr, 60)?;
        st.header.nb_snapshots = snaps.len() as u32;
        st.header.snapshots_offset = new;
        if old != 0 && old_len > 0 {
            for c in old / cs..(old + old_len).div_ceil(cs) {
                st.refs.adjust(self.disk(), c, -1)?;
            }
        }
        Ok(())
    }

    fn find(&self, snaps: &[Snapshot], name: &str) -> Result<usize> {
        snaps
            .iter()
            .position(|s| s.name == name || s.id == name)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "{}: snapshot '{name}' not found",
                    self.path().display()
                ))
            })
    }

    /// `qemu-img snapshot -c`: the active L1 is copied; everything it
    /// references gains a reference and loses its COPIED flag.
    pub fn snapshot_create(&self, name: &str) -> Result<()> {
        let mut snaps = self.snapshots()?;
        if snaps.iter().any(|s| s.name == name) {
            return Err(Error::Usage(format!(
                "{}: a snapshot named '{name}' already exists",
                self.path().display()
            )));
        }
        let cs = self.cluster_size();
        let mut st = self.write_lock();
        let l1 = st.l1.clone();
        let clusters = (l1.len() as u64 * 8).div_ceil(cs).max(1);
        let l1_offset = st.refs.alloc(self.disk(), clusters)? * cs;
        let raw: Vec<u8> = l1
            .iter()
            .flat_map(|e| (e & !COPIED).to_be_bytes())
            .collect();
        self.disk().write(&raw, l1_offset)?;
        self.add_references(&mut st, &l1, 1)?;
        self.fix_copied(&mut st)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let id = snaps
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        snaps.push(Snapshot {
            l1_table_offset: l1_offset,
            l1_size: l1.len() as u32,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(st.header.size),
            icount: Some(0),
        });
        self.write_table(&mut st, &snaps)?;
        self.disk().sync()
    }

    fn snapshot_l1(&self, snap: &Snapshot) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; snap.l1_size as usize * 8];
        self.disk().read_meta(
            &mut raw,
            snap.l1_table_offset,
            &format!("snapshot '{}' L1 table", snap.name),
        )?;
        Ok(raw.chunks(8).map(|c| be64_at(c, 0)).collect())
    }

    /// `qemu-img snapshot -a`: the active L1 becomes a copy of the snapshot's.
    pub fn snapshot_apply(&self, name: &str) -> Result<()> {
        let snaps = self.snapshots()?;
        let snap = &snaps[self.find(&snaps, name)?];
        let mut l1 = self.snapshot_l1(snap)?;
        let mut st = self.write_lock();
        if l1.len() > st.l1.len() {
            return Err(Error::Unsupported {
                path: self.path().into(),
                what: "applying a snapshot with a larger L1 table than the active one".into(),
            });
        }
        l1.resize(st.l1.len(), 0);
        self.add_references(&mut st, &l1, 1)?;
        let old = std::mem::replace(&mut st.l1, l1.iter().map(|e| e & !COPIED).collect());
        let raw: Vec<u8> = st.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.disk().write(&raw, st.header.l1_table_offset)?;
        self.add_references(&mut st, &old, -1)?;
        if let Some(size) = snap.disk_size {
            self.disk().write(&size.to_be_bytes(), 24)?;
            st.header.size = size;
        }
        self.fix_copied(&mut st)?;
        self.disk().sync()
    }

    /// `qemu-img snapshot -d`: the table forgets it first, then its
    /// references are dropped (a crash in between only leaks).
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        let mut snaps = self.snapshots()?;
        let snap = snaps.remove(self.find(&snaps, name)?);
        let l1 = self.snapshot_l1(&snap)?;
        let cs = self.cluster_size();
        let mut st = self.write_lock();
        self.write_table(&mut st, &snaps)?;
        self.add_references(&mut st, &l1, -1)?;
        let clusters = (l1.len() as u64 * 8).div_ceil(cs).max(1);
        for c in 0..clusters {
            st.refs
                .adjust(self.disk(), snap.l1_table_offset / cs + c, -1)?;
        }
        self.fix_copied(&mut st)?;
        self.disk().sync()
    }
}
