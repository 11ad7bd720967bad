//! `qemu-img map --output=json`.

use serde::Serialize;

use super::chain_status;
use crate::block::{Allocation, BlockDevice};
use crate::error::Result;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u32,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl MapEntry {
    /// Whether `next` continues this entry (QEMU merges such runs).
    fn continues(&self, next: &MapEntry) -> bool {
        let same = (
            self.depth,
            self.present,
            self.zero,
            self.data,
            self.compressed,
        ) == (
            next.depth,
            next.present,
            next.zero,
            next.data,
            next.compressed,
        );
        let offsets = match (self.offset, next.offset) {
            (Some(a), Some(b)) => a + self.length == b,
            (None, None) => true,
            _ => false,
        };
        same && offsets && self.start + self.length == next.start
    }

    /// One line of qemu-img's JSON map output.
    pub fn json_line(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        s
    }
}

pub fn map(dev: &dyn BlockDevice) -> Result<Vec<MapEntry>> {
    let size = dev.size();
    let mut out: Vec<MapEntry> = Vec::new();
    let mut at = 0;
    while at < size {
        let st = chain_status(dev, at, size - at)?;
        let entry = match st.alloc {
            Allocation::Data { host, compressed } => MapEntry {
                start: at,
                length: st.len,
                depth: st.depth,
                present: true,
                zero: false,
                data: true,
                compressed,
                offset: if compressed { None } else { host },
            },
            Allocation::Zero | Allocation::Unallocated => MapEntry {
                start: at,
                length: st.len,
                depth: st.depth,
                present: st.alloc == Allocation::Zero,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
            },
        };
        match out.last_mut() {
            Some(last) if last.continues(&entry) => last.length += entry.length,
            _ => out.push(entry),
        }
        at += st.len;
    }
    Ok(out)
}
