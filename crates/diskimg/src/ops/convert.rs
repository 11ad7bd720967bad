//! `qemu-img convert`: copy guest contents between formats, keeping zero
//! ranges sparse and compressing clusters on several threads.

use std::path::{Path, PathBuf};

use super::chain_status;
use crate::block::BlockDevice;
use crate::compress;
use crate::error::{Error, Result};
use crate::image::{Chain, Format};
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
    /// Compression threads.
    pub threads: usize,
    /// Write into an existing target (`-n`).
    pub no_create: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            out_format: Format::Raw,
            create: CreateOptions::default(),
            compress: false,
            min_sparse: 4096,
            threads: 8,
            no_create: false,
        }
    }
}

/// Several sources read as one disk, one after another.
struct Concat {
    parts: Vec<(u64, Box<dyn BlockDevice>)>,
    size: u64,
}

impl Concat {
    fn part(&self, offset: u64) -> (&dyn BlockDevice, u64) {
        let i = self.parts.partition_point(|(start, _)| *start <= offset) - 1;
        let (start, dev) = &self.parts[i];
        (dev.as_ref(), offset - start)
    }

    /// Guest bytes at `offset` that lie in one source and have one status.
    fn status(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let (dev, at) = self.part(offset);
        let len = len.min(dev.size() - at);
        let s = chain_status(dev, at, len)?;
        Ok((s.reads_zero(), s.len))
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
    let src = Concat { parts, size };
    if !opts.no_create {
        create_target(dest, opts, size)?;
    }
    let result = copy(&src, dest, opts, progress);
    if result.is_err() && !opts.no_create {
        let _ = std::fs::remove_file(dest);
    }
    result
}

fn create_target(dest: &Path, opts: &ConvertOptions, size: u64) -> Result<()> {
    match opts.out_format {
        Format::Raw => Raw::create(dest, size),
        Format::Qcow2 => create(
            dest,
            &CreateOptions {
                size,
                ..opts.create.clone()
            },
        ),
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
    let mut at = 0;
    while at < src.size {
        let n = (src.size - at).min(CHUNK);
        match &target {
            Target::Compressed(q) => copy_compressed(src, q, at, n, opts)?,
            Target::Plain(d) => copy_chunk(src, d.as_ref(), at, n, opts)?,
        }
        at += n;
        progress(at as f64 * 100.0 / src.size as f64);
    }
    dev.flush()
}

fn copy_chunk(
    src: &Concat,
    dst: &dyn BlockDevice,
    start: u64,
    len: u64,
    opts: &ConvertOptions,
) -> Result<()> {
    let mut at = start;
    let end = start + len;
    let mut buf = vec![0u8; len as usize];
    while at < end {
        let (zero, n) = src.status(at, end - at)?;
        if zero {
            if opts.no_create {
                dst.write_zeroes(at, n)?;
            }
        } else {
            let data = &mut buf[..n as usize];
            src.read(data, at)?;
            write_sparse(dst, data, at, opts)?;
        }
        at += n;
    }
    Ok(())
}

/// Writes `data`, skipping aligned zero runs of at least `min_sparse`.
fn write_sparse(
    dst: &dyn BlockDevice,
    data: &[u8],
    offset: u64,
    opts: &ConvertOptions,
) -> Result<()> {
    let block = opts.min_sparse as usize;
    if block == 0 {
        return dst.write_at(data, offset);
    }
    let mut i = 0;
    while i < data.len() {
        let zero = |j: usize| data[j..(j + block).min(data.len())].iter().all(|&b| b == 0);
        let kind = zero(i);
        let mut j = i + block;
        while j < data.len() && zero(j) == kind {
            j += block;
        }
        let j = j.min(data.len());
        if !kind {
            dst.write_at(&data[i..j], offset + i as u64)?;
        } else if opts.no_create {
            dst.write_zeroes(offset + i as u64, (j - i) as u64)?;
        }
        i = j;
    }
    Ok(())
}

/// Compresses each non-zero cluster of the chunk on `opts.threads`
/// threads, then stores them in order.
fn copy_compressed(
    src: &Concat,
    q: &Qcow2,
    start: u64,
    len: u64,
    opts: &ConvertOptions,
) -> Result<()> {
    let cs = q.cluster_size();
    let mut buf = vec![0u8; len.div_ceil(cs) as usize * cs as usize];
    let mut at = start;
    while at < start + len {
        let (zero, n) = src.status(at, start + len - at)?;
        if !zero {
            let i = (at - start) as usize;
            src.read(&mut buf[i..i + n as usize], at)?;
        }
        at += n;
    }
    let kind = q.compression();
    let clusters: Vec<&[u8]> = buf.chunks(cs as usize).collect();
    let threads = opts.threads.clamp(1, clusters.len().max(1));
    let per = clusters.len().div_ceil(threads);
    let packed: Vec<Option<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = clusters
            .chunks(per)
            .map(|group| {
                s.spawn(move || {
                    group
                        .iter()
                        .map(|c| {
                            if c.iter().all(|&b| b == 0) {
                                None
                            } else {
                                Some(compress::compress(kind, c).ok_or(*c))
                            }
                        })
                        .map(|r| r.map(|v| v.unwrap_or_else(|raw| raw.to_vec())))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    for (i, c) in packed.into_iter().enumerate() {
        let guest = start + i as u64 * cs;
        match c {
            None if opts.no_create => q.write_zeroes(guest, cs.min(q.size() - guest))?,
            None => {}
            Some(data) if data.len() as u64 == cs => {
                q.write_at(&data[..cs.min(q.size() - guest) as usize], guest)?
            }
            Some(data) => q.write_compressed(guest, &data)?,
        }
    }
    Ok(())
}
