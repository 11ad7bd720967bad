//! `qemu-img convert`: copy guest contents between formats, keeping zero
//! ranges sparse and compressing clusters on several threads.

use std::path::{Path, PathBuf};

mod pipeline;
mod plain;

use super::chain_status;
use crate::block::{Allocation, BlockDevice};
use crate::error::{Error, Result};
use crate::image::{probe, resolve_backing, Chain, Format};
use crate::qcow2::create::{create, CreateOptions};
use crate::qcow2::Qcow2;
use crate::raw::Raw;

/// Bytes read and written per step (a multiple of every cluster size).
const CHUNK: u64 = 2 << 20;

pub struct ConvertOptions {
    pub out_format: Format,
    /// qcow2 creation options; `size` is filled in from the sources.
    pub create: CreateOptions,
    pub compress: bool,
    /// Zero runs of at least this many bytes (aligned) are not written; 0
    /// writes everything.
    pub min_sparse: u64,
    /// Compression threads (`-m`).
    pub threads: usize,
    /// Compressed clusters may be written in the order they are ready
    /// rather than in guest order (`-W`).
    pub out_of_order: bool,
    /// Write into an existing target (`-n`).
    pub no_create: bool,
    /// A backing file for the qcow2 target (`-B`, with `-F`'s format):
    /// only what the source's top image holds is copied.
    pub backing: Option<(String, Option<Format>)>,
    /// fdatasync the target at the end. qemu-img's default target cache
    /// mode (`-t unsafe`) does not; any other `-t` mode does.
    pub flush: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            out_format: Format::Raw,
            create: CreateOptions::default(),
            compress: false,
            min_sparse: 4096,
            threads: 8,
            out_of_order: false,
            no_create: false,
            backing: None,
            flush: false,
        }
    }
}

/// Several sources read as one disk, one after another.
struct Concat {
    parts: Vec<(u64, Box<dyn BlockDevice>)>,
    size: u64,
    /// Only the top image's own ranges count as data (`-B`).
    top_only: bool,
}

/// The last extent a reader learnt of: its start, end and kind.
type Known = Option<(u64, u64, Extent)>;

/// What a range of the source holds, for the copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Extent {
    Data,
    Zero,
    /// Not in the source's top image: left to the target's backing file.
    Backing,
}

impl Concat {
    fn part(&self, offset: u64) -> (&dyn BlockDevice, u64) {
        let i = self.parts.partition_point(|(start, _)| *start <= offset) - 1;
        let (start, dev) = &self.parts[i];
        (dev.as_ref(), offset - start)
    }

    /// Guest bytes at `offset` that lie in one source and have one status.
    fn status(&self, offset: u64, len: u64) -> Result<(Extent, u64)> {
        let (dev, at) = self.part(offset);
        let len = len.min(dev.size() - at);
        if self.top_only {
            let (alloc, n) = dev.block_status(at, len)?;
            let kind = match alloc {
                Allocation::Unallocated => Extent::Backing,
                Allocation::Zero => Extent::Zero,
                Allocation::Data { .. } => Extent::Data,
            };
            return Ok((kind, n.min(len)));
        }
        let s = chain_status(dev, at, len)?;
        let kind = if s.reads_zero() {
            Extent::Zero
        } else {
            Extent::Data
        };
        Ok((kind, s.len))
    }

    /// `status` of the range from `offset` to at most `end`, through
    /// `known`: each query asks about the rest of the source and the
    /// answer is kept, so an extent spanning many chunks costs one query
    /// (two lseeks on a raw file) rather than one per chunk.
    fn status_upto(&self, known: &mut Known, offset: u64, end: u64) -> Result<(Extent, u64)> {
        match *known {
            Some((from, to, kind)) if from <= offset && offset < to => {
                return Ok((kind, to.min(end) - offset))
            }
            _ => {}
        }
        let (kind, n) = self.status(offset, self.size - offset)?;
        *known = Some((offset, offset + n, kind));
        Ok((kind, n.min(end - offset)))
    }

    /// Whether zeroes must be written rather than left as holes: into an
    /// existing target (`-n`) or over a backing file (`-B`).
    fn explicit_zeroes(&self, opts: &ConvertOptions) -> bool {
        opts.no_create || self.top_only
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let (dev, at) = self.part(offset + done as u64);
            let n = ((buf.len() - done) as u64).min(dev.size() - at) as usize;
            dev.read_at(&mut buf[done..done + n], at)?;
            done += n;
        }
        Ok(())
    }
}

/// Converts `sources` into `dest`. A failure removes a target this call
/// created; the sources are only ever opened read-only.
pub fn convert(
    sources: &[(PathBuf, Option<Format>)],
    dest: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(f64),
) -> Result<()> {
    let mut parts = Vec::new();
    let mut size = 0;
    for (path, fmt) in sources {
        let dev = Chain::new().open(path, true, *fmt)?;
        let n = dev.size();
        parts.push((size, dev));
        size += n;
    }
    parts.retain(|(_, d)| d.size() > 0);
    check_backing(sources, dest, opts)?;
    let src = Concat {
        parts,
        size,
        top_only: opts.backing.is_some(),
    };
    if !opts.no_create {
        create_target(dest, opts, size)?;
    }
    let result = copy(&src, dest, opts, progress);
    if result.is_err() && !opts.no_create {
        let _ = std::fs::remove_file(dest);
    }
    result
}

/// `-B` as qemu-img allows it: one source, an uncompressed qcow2 target.
fn check_backing(
    sources: &[(PathBuf, Option<Format>)],
    dest: &Path,
    opts: &ConvertOptions,
) -> Result<()> {
    if opts.backing.is_none() {
        return Ok(());
    }
    if sources.len() > 1 {
        return Err(Error::Usage(
            "Specifying backing image makes no sense when concatenating multiple input images"
                .into(),
        ));
    }
    if opts.out_format != Format::Qcow2 {
        return Err(Error::Usage(format!(
            "Backing file not supported for file format '{}'",
            opts.out_format.name()
        )));
    }
    if opts.compress {
        return Err(Error::Unsupported {
            path: dest.into(),
            what: "compressed conversion (-c) onto a backing file (-B)".into(),
        });
    }
    Ok(())
}

fn create_target(dest: &Path, opts: &ConvertOptions, size: u64) -> Result<()> {
    let mut create_opts = CreateOptions {
        size,
        ..opts.create.clone()
    };
    if let Some((name, format)) = &opts.backing {
        let format = match format {
            Some(f) => *f,
            None => probe(&resolve_backing(dest, name))?,
        };
        create_opts.backing_file = Some(name.clone());
        create_opts.backing_format = Some(format.name().to_string());
    }
    match opts.out_format {
        Format::Raw => Raw::create(dest, size),
        Format::Qcow2 => create(dest, &create_opts),
        Format::Vmdk => Err(Error::Unsupported {
            path: dest.into(),
            what: "writing VMDK images".into(),
        }),
    }
}

/// The converted image: written through the trait, or (for `-c`)
/// through qcow2's compressed-cluster writes.
enum Target {
    Plain(Box<dyn BlockDevice>),
    Compressed(Box<Qcow2>),
}

fn copy(
    src: &Concat,
    dest: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(f64),
) -> Result<()> {
    let mut chain = Chain::new();
    let target = match opts.out_format {
        Format::Qcow2 if opts.compress => {
            Target::Compressed(Box::new(chain.open_qcow2(dest, false)?))
        }
        fmt => Target::Plain(chain.open(dest, false, Some(fmt))?),
    };
    let dev: &dyn BlockDevice = match &target {
        Target::Plain(d) => d.as_ref(),
        Target::Compressed(q) => q.as_ref(),
    };
    if dev.size() < src.size {
        return Err(Error::Usage(format!(
            "{}: target is smaller ({} bytes) than the source ({} bytes)",
            dest.display(),
            dev.size(),
            src.size
        )));
    }
    progress(0.0);
    match &target {
        Target::Compressed(q) => pipeline::copy_compressed(src, q, opts, progress)?,
        Target::Plain(d) => plain::copy_plain(src, d.as_ref(), dest, opts, progress)?,
    }
    if opts.flush {
        dev.flush()?;
    }
    progress(100.0);
    Ok(())
}

/// Whether `buf` is all zero bytes. ORs 256-byte blocks (which the
/// compiler vectorises) and stops at the first block that is not zero.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}
