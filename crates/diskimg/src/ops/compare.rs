//! `qemu-img compare`: are two images' guest-visible contents equal?

use super::chain_status;
use crate::block::BlockDevice;
use crate::buf::AlignedBuf;
use crate::error::Result;

const CHUNK: u64 = 1 << 20;
const SECTOR: u64 = 512;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Comparison {
    Identical,
    /// First differing 512-byte sector's offset.
    ContentMismatch(u64),
    /// Strict mode: sizes differ.
    SizeMismatch,
    /// Strict mode: allocation differs at this offset.
    StatusMismatch(u64),
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<u64> {
    a.chunks(SECTOR as usize)
        .zip(b.chunks(SECTOR as usize))
        .position(|(x, y)| x != y)
        .map(|i| i as u64 * SECTOR)
}

fn first_nonzero(a: &[u8]) -> Option<u64> {
    a.chunks(SECTOR as usize)
        .position(|x| x.iter().any(|&b| b != 0))
        .map(|i| i as u64 * SECTOR)
}

/// Compares `a` and `b`. Without `strict`, the longer image's tail must
/// read as zeroes; with it, sizes and allocation must match too.
pub fn compare(a: &dyn BlockDevice, b: &dyn BlockDevice, strict: bool) -> Result<Comparison> {
    if strict && a.size() != b.size() {
        return Ok(Comparison::SizeMismatch);
    }
    let common = a.size().min(b.size());
    let mut at = 0;
    let (mut ba, mut bb) = (
        AlignedBuf::page(CHUNK as usize),
        AlignedBuf::page(CHUNK as usize),
    );
    while at < common {
        let sa = chain_status(a, at, (common - at).min(CHUNK))?;
        let sb = chain_status(b, at, sa.len)?;
        let n = sb.len;
        if strict && sa.reads_zero() != sb.reads_zero() {
            return Ok(Comparison::StatusMismatch(at));
        }
        if !(sa.reads_zero() && sb.reads_zero()) {
            let (x, y) = (&mut ba[..n as usize], &mut bb[..n as usize]);
            a.read_at(x, at)?;
            b.read_at(y, at)?;
            if let Some(d) = first_diff(x, y) {
                return Ok(Comparison::ContentMismatch(at + d));
            }
        }
        at += n;
    }
    let longer: &dyn BlockDevice = if a.size() > b.size() { a } else { b };
    while at < longer.size() {
        let s = chain_status(longer, at, (longer.size() - at).min(CHUNK))?;
        if !s.reads_zero() {
            let x = &mut ba[..s.len as usize];
            longer.read_at(x, at)?;
            if let Some(d) = first_nonzero(x) {
                return Ok(Comparison::ContentMismatch(at + d));
            }
        }
        at += s.len;
    }
    Ok(Comparison::Identical)
}
