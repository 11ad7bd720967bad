//! The qcow2 internal snapshot table.

use std::path::Path;

use crate::disk::{be64_at, Disk};
use crate::error::{invalid, Result};

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
        let id_len = be16(&fixed, 12);
        let name_len = be16(&fixed, 14);
        let mut rest = vec![0u8; extra_len + id_len + name_len];
        disk.read_meta(&mut rest, at + 40, &format!("snapshot {i} names"))?;
        let l1_table_offset = be64_at(&fixed, 0);
        if l1_table_offset % cluster_size != 0 {
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
