//! `qemu-img commit` and `qemu-img rebase`.

use std::path::{Path, PathBuf};

use super::chain_status;
use crate::block::{Allocation, BlockDevice};
use crate::buf::AlignedBuf;
use crate::error::{Error, Result};
use crate::image::{resolve_backing, Chain, Format};

const CHUNK: u64 = 1 << 20;

/// Copies what `top` and the images between it and `base` hold into
/// `base` (by default the immediate backing file); unless `keep`, then
/// empties `top`. As qemu-img, a base further down the chain implies
/// `keep`: the images in between no longer read as they did, so `top`
/// must keep its data.
pub fn commit(top: &Path, base: Option<&Path>, keep: bool) -> Result<()> {
    let chain = backing_chain(top)?;
    if chain.len() < 2 {
        return Err(Error::Usage(format!(
            "{}: Image does not have a backing file",
            top.display()
        )));
    }
    let depth = match base {
        None => 1,
        Some(b) => {
            let wanted = b.canonicalize().ok();
            chain
                .iter()
                .skip(1)
                .position(|(p, _)| p.canonicalize().ok() == wanted)
                .map(|i| i + 1)
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "Did not find '{}' in the backing chain of '{}'",
                        b.display(),
                        top.display()
                    ))
                })?
        }
    };
    let reader = Chain::new().open_qcow2(top, true)?;
    let (base_path, base_format) = &chain[depth];
    let target = Chain::new().open(base_path, false, *base_format)?;
    copy_above(&reader, target.as_ref(), depth as u32)?;
    target.flush()?;
    drop(reader);
    if !keep && depth == 1 {
        Chain::without_backing()
            .open_qcow2(top, false)?
            .make_empty()?;
    }
    Ok(())
}

/// The files of `top`'s backing chain with their formats, `top` first.
fn backing_chain(top: &Path) -> Result<Vec<(PathBuf, Option<Format>)>> {
    let mut chain = vec![(top.to_path_buf(), Some(Format::Qcow2))];
    let mut seen = Chain::without_backing();
    loop {
        let (path, format) = chain.last().cloned().expect("chain starts with top");
        let format = match format {
            Some(f) => f,
            None => crate::image::probe(&path)?,
        };
        if format != Format::Qcow2 {
            return Ok(chain);
        }
        let header = seen.open_qcow2(&path, true)?.header();
        let Some(name) = header.backing_file else {
            return Ok(chain);
        };
        let fmt = header
            .backing_format
            .as_deref()
            .map(str::parse::<Format>)
            .transpose()?;
        chain.push((resolve_backing(&path, &name), fmt));
    }
}

/// Writes into `target` every range that the layers of `reader`'s chain
/// above `depth` decide (data or zeroes).
fn copy_above(reader: &dyn BlockDevice, target: &dyn BlockDevice, depth: u32) -> Result<()> {
    let size = reader.size().min(target.size());
    let mut buf = AlignedBuf::page(CHUNK as usize);
    let mut at = 0;
    while at < size {
        let s = chain_status(reader, at, (size - at).min(CHUNK))?;
        let n = s.len;
        if s.depth < depth {
            match s.alloc {
                Allocation::Unallocated => {}
                Allocation::Zero => target.write_zeroes(at, n)?,
                Allocation::Data { .. } => {
                    reader.read_at(&mut buf[..n as usize], at)?;
                    target.write_at(&buf[..n as usize], at)?;
                }
            }
        }
        at += n;
    }
    Ok(())
}

/// Changes `image`'s backing file to `new` (None: no backing file). In
/// safe mode every range the image does not hold, and where the old and
/// new backing files differ, is first copied into the image.
pub fn rebase(
    image: &Path,
    new: Option<&str>,
    new_format: Option<Format>,
    unsafe_mode: bool,
) -> Result<()> {
    let fmt_name = |f: Format| f.name().to_string();
    let new_path: Option<PathBuf> = new.map(|n| resolve_backing(image, n));
    let new_format = match (&new_path, new_format) {
        (Some(p), None) if p.exists() => Some(crate::image::probe(p)?),
        (_, f) => f,
    };
    if !unsafe_mode {
        let img = Chain::new().open_qcow2(image, false)?;
        let new_dev: Option<Box<dyn BlockDevice>> = match &new_path {
            Some(p) => Some(Chain::new().open(p, true, new_format)?),
            None => None,
        };
        copy_differences(&img, new_dev.as_deref())?;
        img.flush()?;
    }
    let img = Chain::without_backing().open_qcow2(image, false)?;
    img.set_backing(new, new_format.map(fmt_name).as_deref())
}

fn copy_differences(img: &crate::qcow2::Qcow2, new: Option<&dyn BlockDevice>) -> Result<()> {
    let size = img.size();
    let old = img.backing();
    let read = |dev: Option<&dyn BlockDevice>, buf: &mut [u8], at: u64| -> Result<()> {
        buf.fill(0);
        if let Some(d) = dev {
            let n = d.size().saturating_sub(at).min(buf.len() as u64) as usize;
            if n > 0 {
                d.read_at(&mut buf[..n], at)?;
            }
        }
        Ok(())
    };
    let (mut a, mut b) = (
        AlignedBuf::page(CHUNK as usize),
        AlignedBuf::page(CHUNK as usize),
    );
    let mut at = 0;
    while at < size {
        let (alloc, n) = img.block_status(at, (size - at).min(CHUNK))?;
        if alloc == Allocation::Unallocated {
            let zero_old = match old {
                Some(o) if at < o.size() => {
                    let s = chain_status(o, at, n.min(o.size() - at))?;
                    s.reads_zero() && s.len >= n
                }
                _ => true,
            };
            let (x, y) = (&mut a[..n as usize], &mut b[..n as usize]);
            if zero_old {
                x.fill(0);
            } else {
                read(old, x, at)?;
            }
            read(new, y, at)?;
            if x != y {
                img.write_at(x, at)?;
            }
        }
        at += n;
    }
    Ok(())
}
