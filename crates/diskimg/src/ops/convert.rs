//! `qemu-img convert`: copy guest contents between formats, keeping zero
//! ranges sparse and compressing clusters on several threads.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

mod pipeline;

use super::chain_status;
use crate::block::{Allocation, BlockDevice};
use crate::buf::AlignedBuf;
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
        Target::Plain(d) => copy_plain(src, d.as_ref(), dest, opts, progress)?,
    }
    if opts.flush {
        dev.flush()?;
    }
    progress(100.0);
    Ok(())
}

/// The extents of one chunk of the source (offset, length, what it
/// holds); the data of those that hold data is in the reader's buffer.
struct Chunk {
    start: u64,
    extents: Vec<(u64, u64, Extent)>,
}

/// Copies through the trait on `-m` threads (qemu-img's parallel
/// requests), each reading a chunk into its own buffer and writing it when
/// its turn comes: reads overlap writes, and the target is still written
/// in guest order so its layout stays sequential. The calling thread is
/// one of them (it alone reports progress). The chunks and their extents
/// come from one `Plan`, so the source is asked about each extent once,
/// not once per thread that meets it.
fn copy_plain(
    src: &Concat,
    dst: &dyn BlockDevice,
    dest: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(f64),
) -> Result<()> {
    let workers = opts.threads.max(1);
    let plan = Mutex::new(Plan {
        next: 0,
        known: None,
    });
    let turn = Turn::new(workers);
    let run = |progress: &mut dyn FnMut(f64)| copy_chunks(src, dst, opts, &plan, &turn, progress);
    std::thread::scope(|s| {
        let others: Vec<_> = (1..workers).map(|_| s.spawn(|| run(&mut |_| {}))).collect();
        let mut result = run(progress);
        for h in others {
            let r = h.join().unwrap_or_else(|_| {
                Err(Error::Usage(format!(
                    "{}: a copying thread panicked",
                    dest.display()
                )))
            });
            result = result.and(r);
        }
        result
    })
}

/// Hands out the chunks in order, with their extents.
struct Plan {
    /// The number of the next chunk.
    next: u64,
    known: Known,
}

impl Plan {
    /// The next chunk's number and extents; None past the end.
    fn claim(&mut self, src: &Concat) -> Option<(u64, Result<Chunk>)> {
        let i = self.next;
        let start = i * CHUNK;
        if start >= src.size {
            return None;
        }
        self.next += 1;
        let end = (src.size - start).min(CHUNK) + start;
        Some((i, self.extents(src, start, end)))
    }

    fn extents(&mut self, src: &Concat, start: u64, end: u64) -> Result<Chunk> {
        let mut extents = Vec::new();
        let mut at = start;
        while at < end {
            let (kind, n) = src.status_upto(&mut self.known, at, end)?;
            extents.push((at, n, kind));
            at += n;
        }
        Ok(Chunk { start, extents })
    }
}

/// Whose turn it is to write: the number of the next chunk, or that a
/// writer failed (the others then stop). The chunks claimed and not yet
/// written are at most one per worker and consecutive, so chunk `i`'s
/// waiter is alone on condition variable `i % workers` and each write
/// wakes only the next chunk's writer.
struct Turn {
    state: Mutex<(u64, bool)>,
    changed: Vec<Condvar>,
}

impl Turn {
    fn new(workers: usize) -> Turn {
        Turn {
            state: Mutex::new((0, false)),
            changed: (0..workers).map(|_| Condvar::new()).collect(),
        }
    }

    fn cv(&self, i: u64) -> &Condvar {
        &self.changed[(i % self.changed.len() as u64) as usize]
    }

    /// Waits until chunk `i` may be written; false if a writer failed.
    fn wait(&self, i: u64) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while st.0 != i && !st.1 {
            st = self.cv(i).wait(st).unwrap_or_else(|e| e.into_inner());
        }
        !st.1
    }

    /// Chunk `i` is written: the next one may go.
    fn pass(&self, i: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = i + 1;
        self.cv(i + 1).notify_all();
    }

    /// A writer failed: every waiting one stops.
    fn fail(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        self.changed.iter().for_each(Condvar::notify_all);
    }
}

/// Fails the copy if its thread unwinds, so that no writer waits forever
/// for a turn that will not come.
struct FailOnUnwind<'a>(&'a Turn);

impl Drop for FailOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail();
        }
    }
}

fn copy_chunks(
    src: &Concat,
    dst: &dyn BlockDevice,
    opts: &ConvertOptions,
    plan: &Mutex<Plan>,
    turn: &Turn,
    progress: &mut dyn FnMut(f64),
) -> Result<()> {
    let mut buf = AlignedBuf::page(CHUNK as usize);
    let _guard = FailOnUnwind(turn);
    loop {
        let claimed = plan.lock().unwrap_or_else(|e| e.into_inner()).claim(src);
        let Some((i, chunk)) = claimed else {
            return Ok(());
        };
        let chunk = chunk.and_then(|c| read_chunk(src, c, &mut buf));
        if !turn.wait(i) {
            return Ok(());
        }
        let written =
            chunk.and_then(|c| write_chunk(dst, &c, &buf, opts, src.explicit_zeroes(opts)));
        if let Err(e) = written {
            turn.fail();
            return Err(e);
        }
        turn.pass(i);
        let done = ((i + 1) * CHUNK).min(src.size);
        progress(done as f64 * 100.0 / src.size as f64);
    }
}

/// Reads the data extents of `chunk` into `buf`.
fn read_chunk(src: &Concat, chunk: Chunk, buf: &mut [u8]) -> Result<Chunk> {
    for &(at, n, kind) in &chunk.extents {
        if kind == Extent::Data {
            let i = (at - chunk.start) as usize;
            src.read(&mut buf[i..i + n as usize], at)?;
        }
    }
    Ok(chunk)
}

fn write_chunk(
    dst: &dyn BlockDevice,
    chunk: &Chunk,
    buf: &[u8],
    opts: &ConvertOptions,
    explicit_zeroes: bool,
) -> Result<()> {
    for &(at, n, kind) in &chunk.extents {
        match kind {
            Extent::Backing => {}
            Extent::Zero if explicit_zeroes => dst.write_zeroes(at, n)?,
            Extent::Zero => {}
            Extent::Data => {
                let i = (at - chunk.start) as usize;
                let data = &buf[i..i + n as usize];
                write_sparse(dst, data, at, opts.min_sparse, explicit_zeroes)?;
            }
        }
    }
    Ok(())
}

/// Writes `data`, skipping aligned zero runs of at least `min_sparse`
/// (or writing them as zeroes, where `explicit_zeroes`).
fn write_sparse(
    dst: &dyn BlockDevice,
    data: &[u8],
    offset: u64,
    min_sparse: u64,
    explicit_zeroes: bool,
) -> Result<()> {
    let block = min_sparse as usize;
    if block == 0 {
        return dst.write_at(data, offset);
    }
    let mut i = 0;
    while i < data.len() {
        let zero = |j: usize| is_zero(&data[j..(j + block).min(data.len())]);
        let kind = zero(i);
        let mut j = i + block;
        while j < data.len() && zero(j) == kind {
            j += block;
        }
        let j = j.min(data.len());
        if !kind {
            dst.write_at(&data[i..j], offset + i as u64)?;
        } else if explicit_zeroes {
            dst.write_zeroes(offset + i as u64, (j - i) as u64)?;
        }
        i = j;
    }
    Ok(())
}

/// Whether `buf` is all zero bytes. ORs 256-byte blocks (which the
/// compiler vectorises) and stops at the first block that is not zero.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(256)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}
