//! `qemu-img check` for qcow2: recount every reference to every cluster,
//! compare with the stored refcounts and the COPIED flags, and optionally
//! repair leaks (or everything that can be rewritten in place).

use serde::Serialize;

use super::{refcount, snapshot, Qcow2, State, COMPRESSED, COPIED, OFFSET_MASK};
use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    Leaks,
    All,
}

/// qemu-img check's figures; `messages` are its per-problem lines.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckResult {
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    pub allocated_clusters: u64,
    pub total_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    pub image_end_offset: u64,
    pub messages: Vec<String>,
}

/// An active L1 or L2 entry whose COPIED flag must follow its refcount.
#[derive(Clone, Copy)]
enum Owner {
    L1 { index: usize },
    L2 { table: u64, word: usize },
}

struct Scan {
    result: CheckResult,
    counted: Vec<u64>,
    file_len: u64,
    owners: Vec<(Owner, u64)>,
    mismatches: Vec<(u64, u64, u64)>,
    copied_wrong: Vec<(Owner, u64)>,
}

impl Scan {
    fn count(&mut self, cs: u64, offset: u64, len: u64, what: &str) {
        if len == 0 {
            return;
        }
        if offset >= self.file_len {
            self.result.corruptions += 1;
            self.result.messages.push(format!(
                "ERROR {what} at offset 0x{offset:x} lies beyond the end of the file"
            ));
            return;
        }
        let last = (offset + len - 1).min(self.file_len - 1) / cs;
        if self.counted.len() <= last as usize {
            self.counted.resize(last as usize + 1, 0);
        }
        for c in offset / cs..=last {
            self.counted[c as usize] += 1;
        }
    }
}

/// Checks the image; with `repair`, fixes what it may, then checks again
/// and reports what is left (with the fixed counts), as qemu-img does.
pub fn check(q: &Qcow2, repair: Option<Repair>) -> Result<CheckResult> {
    let mut st = q.write_lock();
    let first = scan(q, &mut st)?;
    let Some(mode) = repair else {
        return Ok(first.result);
    };
    let (leaks_fixed, corruptions_fixed, mut messages) = fix(q, &mut st, &first, mode)?;
    if leaks_fixed + corruptions_fixed == 0 {
        return Ok(first.result);
    }
    q.disk().sync()?;
    let mut after = scan(q, &mut st)?.result;
    after.leaks_fixed = leaks_fixed;
    after.corruptions_fixed = corruptions_fixed;
    messages.append(&mut after.messages);
    after.messages = messages;
    Ok(after)
}

fn scan(q: &Qcow2, st: &mut State) -> Result<Scan> {
    let cs = q.cluster_size();
    let file_len = q.disk().len()?;
    let mut s = Scan {
        result: CheckResult {
            total_clusters: st.header.size.div_ceil(cs),
            ..Default::default()
        },
        // Sized once: counts never lie past the end of the file.
        counted: vec![0; file_len.div_ceil(cs) as usize],
        file_len,
        owners: Vec::new(),
        mismatches: Vec::new(),
        copied_wrong: Vec::new(),
    };
    s.count(cs, 0, cs, "header");
    s.count(
        cs,
        st.header.l1_table_offset,
        st.l1.len() as u64 * 8,
        "L1 table",
    );
    let l1 = st.l1.clone();
    walk_l1(q, st, &mut s, &l1, true)?;
    walk_snapshots(q, st, &mut s)?;
    count_refcount_structure(q, st, &mut s)?;
    compare(q, st, &mut s)?;
    Ok(s)
}

fn walk_l1(q: &Qcow2, st: &State, s: &mut Scan, l1: &[u64], active: bool) -> Result<()> {
    let cs = q.cluster_size();
    let words = if q.ext_l2 { 2 } else { 1 };
    let mut last_host = 0u64;
    for (index, &e) in l1.iter().enumerate() {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if !l2.is_multiple_of(cs) || l2 >= s.file_len {
            s.result.corruptions += 1;
            s.result.messages.push(format!("ERROR l2_offset={l2:x}: L2 table is not cluster aligned or lies beyond the end of the file; L1 entry {index} corrupted"));
            continue;
        }
        s.count(cs, l2, cs, "L2 table");
        if active {
            s.owners.push((Owner::L1 { index }, e));
        }
        let table = q.with_l2(st, l2, |t| t.to_vec())?;
        if active {
            s.owners.reserve(table.len() / words);
        }
        for (i, pair) in table.chunks(words).enumerate() {
            let (entry, bitmap) = (pair[0], pair.get(1).copied().unwrap_or(0));
            if entry & COMPRESSED != 0 {
                let (off, len) = q.compressed_range(entry);
                s.count(cs, off, len, "compressed cluster");
                if active {
                    // QEMU counts compressed clusters as fragmented too.
                    s.result.allocated_clusters += 1;
                    s.result.compressed_clusters += 1;
                    s.result.fragmented_clusters += 1;
                    if entry & COPIED != 0 {
                        s.result.corruptions += 1;
                        s.result.messages.push(format!("ERROR: coffset=0x{off:x}: copied flag must never be set for compressed clusters"));
                    }
                }
                continue;
            }
            if q.ext_l2 && (bitmap & (bitmap >> 32) & 0xffff_ffff) != 0 {
                s.result.corruptions += 1;
                s.result.messages.push(format!(
                    "ERROR: L2 table 0x{l2:x} entry {i}: subcluster both allocated and zero"
                ));
            }
            let host = entry & OFFSET_MASK;
            if host == 0 {
                continue;
            }
            if !host.is_multiple_of(cs) {
                s.result.corruptions += 1;
                s.result.messages.push(format!("ERROR offset={host:x}: Data cluster is not properly aligned; L2 entry corrupted."));
                continue;
            }
            s.count(cs, host, cs, "data cluster");
            if active {
                s.result.allocated_clusters += 1;
                if last_host != 0 && host != last_host + cs {
                    s.result.fragmented_clusters += 1;
                }
                last_host = host;
                s.owners.push((
                    Owner::L2 {
                        table: l2,
                        word: i * words,
                    },
                    entry,
                ));
            }
        }
    }
    Ok(())
}

fn walk_snapshots(q: &Qcow2, st: &State, s: &mut Scan) -> Result<()> {
    let h = &st.header;
    if h.nb_snapshots == 0 {
        return Ok(());
    }
    let cs = q.cluster_size();
    let (snaps, len) = snapshot::read_table(q.disk(), h.snapshots_offset, h.nb_snapshots, cs)?;
    s.count(cs, h.snapshots_offset, len, "snapshot table");
    for snap in snaps {
        let bytes = u64::from(snap.l1_size) * 8;
        s.count(cs, snap.l1_table_offset, bytes, "snapshot L1 table");
        if snap.l1_table_offset + bytes > s.file_len || bytes > 32 << 20 {
            continue;
        }
        let mut raw = vec![0u8; bytes as usize];
        q.disk()
            .read_meta(&mut raw, snap.l1_table_offset, "snapshot L1 table")?;
        let l1: Vec<u64> = raw.chunks(8).map(|c| crate::disk::be64_at(c, 0)).collect();
        walk_l1(q, st, s, &l1, false)?;
    }
    Ok(())
}

fn count_refcount_structure(q: &Qcow2, st: &State, s: &mut Scan) -> Result<()> {
    let cs = q.cluster_size();
    s.count(
        cs,
        st.refs.table_offset,
        st.refs.table_clusters() * cs,
        "refcount table",
    );
    for (i, &e) in st.refs.table.iter().enumerate() {
        let off = e & 0xffff_ffff_ffff_fe00;
        if off == 0 {
            continue;
        }
        if off % cs != 0 || off >= s.file_len {
            s.result.corruptions += 1;
            s.result.messages.push(format!("ERROR refcount block {i} at 0x{off:x} is not cluster aligned or lies outside the image; refcount table entry corrupted"));
            continue;
        }
        s.count(cs, off, cs, "refcount block");
    }
    Ok(())
}

/// The stored refcounts, block by block, read once for the whole scan
/// (a lookup per cluster through the refcount cache costs more than the
/// scan itself).
struct Stored {
    order: u32,
    per: u64,
    blocks: Vec<Option<Vec<u8>>>,
}

impl Stored {
    fn load(q: &Qcow2, st: &mut State, clusters: u64) -> Stored {
        let per = st.refs.per_block();
        // Clusters past what the table can count (hostile entries) read 0.
        let tables = clusters.div_ceil(per).min(st.refs.table.len() as u64);
        let blocks = (0..tables)
            .map(|t| st.refs.block_copy(q.disk(), t as usize).unwrap_or(None))
            .collect();
        Stored {
            order: st.refs.order(),
            per,
            blocks,
        }
    }

    fn get(&self, c: u64) -> u64 {
        match self.blocks.get((c / self.per) as usize) {
            Some(Some(b)) => refcount::get_entry(b, self.order, c % self.per),
            _ => 0,
        }
    }
}

fn compare(q: &Qcow2, st: &mut State, s: &mut Scan) -> Result<()> {
    let cs = q.cluster_size();
    let nb = s.file_len.div_ceil(cs).max(s.counted.len() as u64);
    let max_owned = s
        .owners
        .iter()
        .map(|&(_, e)| (e & OFFSET_MASK) / cs + 1)
        .max()
        .unwrap_or(0);
    let stored = Stored::load(q, st, nb.max(max_owned));
    for c in 0..nb {
        let refcount = stored.get(c);
        let counted = s.counted.get(c as usize).copied().unwrap_or(0);
        // As QEMU: the image ends after the last cluster counted or stored.
        if refcount > 0 || counted > 0 {
            s.result.image_end_offset = (c + 1) * cs;
        }
        if refcount == counted {
            continue;
        }
        if refcount > counted {
            s.result.leaks += 1;
            s.result.messages.push(format!(
                "Leaked cluster {c} refcount={refcount} reference={counted}"
            ));
        } else {
            s.result.corruptions += 1;
            s.result.messages.push(format!(
                "ERROR cluster {c} refcount={refcount} reference={counted}"
            ));
        }
        s.mismatches.push((c, refcount, counted));
    }
    check_copied(cs, &stored, s);
    Ok(())
}

fn check_copied(cs: u64, stored: &Stored, s: &mut Scan) {
    for &(owner, entry) in &s.owners {
        let refcount = stored.get((entry & OFFSET_MASK) / cs);
        if (refcount == 1) == (entry & COPIED != 0) {
            continue;
        }
        s.result.corruptions += 1;
        let what = match owner {
            Owner::L1 { index } => format!("ERROR OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={entry:x} refcount={refcount}"),
            Owner::L2 { .. } => format!("ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}"),
        };
        s.result.messages.push(what);
        s.copied_wrong.push((owner, entry));
    }
}

/// Returns (leaks fixed, corruptions fixed, messages).
fn fix(q: &Qcow2, st: &mut State, s: &Scan, mode: Repair) -> Result<(u64, u64, Vec<String>)> {
    let cs = q.cluster_size();
    let disk = q.disk();
    // New refcount blocks must not land on clusters whose stored count is wrong.
    st.refs
        .set_floor(s.file_len.div_ceil(cs).max(s.counted.len() as u64));
    let (mut leaks, mut corruptions) = (0, 0);
    let mut messages = Vec::new();
    for &(c, stored, counted) in &s.mismatches {
        let leak = stored > counted;
        if !leak && mode != Repair::All {
            continue;
        }
        messages.push(format!(
            "Repairing cluster {c} refcount={stored} reference={counted}"
        ));
        st.refs.set(disk, c, counted)?;
        if leak {
            leaks += 1;
        } else {
            corruptions += 1;
        }
    }
    if mode == Repair::All {
        for &(owner, entry) in &s.copied_wrong {
            let refcount = st.refs.get(disk, (entry & OFFSET_MASK) / cs)?;
            let fixed = if refcount == 1 {
                entry | COPIED
            } else {
                entry & !COPIED
            };
            match owner {
                Owner::L1 { index } => {
                    st.l1[index] = fixed;
                    disk.write(
                        &fixed.to_be_bytes(),
                        st.header.l1_table_offset + index as u64 * 8,
                    )?;
                }
                Owner::L2 { table, word } => {
                    q.l2_mut(st, table)?[word] = fixed;
                    disk.write(&fixed.to_be_bytes(), table + word as u64 * 8)?;
                }
            }
            messages.push(format!("Repairing OFLAG_COPIED entry {entry:x}"));
            corruptions += 1;
        }
    }
    Ok((leaks, corruptions, messages))
}
