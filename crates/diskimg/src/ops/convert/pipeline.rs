//! Compressed conversion as a pipeline: the calling thread reads the
//! source a chunk at a time, worker threads compress the chunk's clusters
//! (each with its own reusable compressor), and one writer thread stores
//! them, in guest order unless `-W`. Reading, compressing and writing
//! overlap. A chunk's buffer travels reader -> worker -> writer and back
//! to the reader, so cluster data is never copied between them, and runs
//! of clusters that did not compress are written straight from it.

use std::collections::BTreeMap;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};

use super::{is_zero, Concat, ConvertOptions, Extent, Known, CHUNK};
use crate::block::BlockDevice;
use crate::buf::AlignedBuf;
use crate::compress::Compressor;
use crate::error::{io, Error, Result};
use crate::qcow2::header::Compression;
use crate::qcow2::Qcow2;

/// A chunk of the source to compress, numbered in guest order: the
/// indexes (in the chunk) of its clusters that are not all zeroes.
struct Job {
    seq: u64,
    start: u64,
    buf: AlignedBuf,
    clusters: Vec<usize>,
}

/// A compressed chunk: per cluster, its compressed bytes, or None where
/// it is stored as it is (from the chunk's buffer).
struct Packed {
    job: Job,
    compressed: Vec<Option<Vec<u8>>>,
}

type Jobs = Arc<Mutex<Receiver<Job>>>;

pub(super) fn copy_compressed(
    src: &Concat,
    q: &Qcow2,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(f64),
) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = opts.threads.clamp(1, cores);
    let (job_tx, job_rx) = sync_channel::<Job>(workers);
    let (done_tx, done_rx) = sync_channel::<Packed>(workers);
    let (free_tx, free_rx) = channel::<AlignedBuf>();
    // Only the workers hold the job queue: if they all stop, reading stops.
    let job_rx: Jobs = Arc::new(Mutex::new(job_rx));
    let kind = q.compression();
    std::thread::scope(|s| {
        let compressing: Vec<_> = (0..workers)
            .map(|_| {
                let (jobs, done) = (Arc::clone(&job_rx), done_tx.clone());
                s.spawn(move || compress_jobs(q, kind, jobs, done))
            })
            .collect();
        drop((job_rx, done_tx));
        let writer = s.spawn(|| store(q, done_rx, free_tx, !opts.out_of_order));
        let read = read_chunks(src, q, opts, (job_tx, free_rx), progress);
        let mut result = read;
        for h in compressing.into_iter().chain(std::iter::once(writer)) {
            let r = h.join().unwrap_or_else(|_| {
                Err(Error::Usage(format!(
                    "{}: a compressing thread panicked",
                    q.path().display()
                )))
            });
            result = result.and(r);
        }
        result
    })
}

/// Reads the source chunk by chunk (into buffers the writer hands back)
/// and queues each chunk's clusters that are not all zeroes (with `-n`,
/// zero clusters are zeroed in the target here).
fn read_chunks(
    src: &Concat,
    q: &Qcow2,
    opts: &ConvertOptions,
    (jobs, free): (SyncSender<Job>, Receiver<AlignedBuf>),
    progress: &mut dyn FnMut(f64),
) -> Result<()> {
    let cs = q.cluster_size();
    let mut seq = 0;
    let mut start = 0;
    // A buffer the last chunk did not need (it held only zeroes).
    let mut spare = None;
    let mut known = None;
    while start < src.size {
        let len = (src.size - start).min(CHUNK);
        let mut buf = spare
            .take()
            .or_else(|| free.try_recv().ok())
            .unwrap_or_else(|| AlignedBuf::page(CHUNK as usize));
        let has_data = read_chunk(src, &mut known, (start, len), cs, &mut buf)?;
        let mut clusters = Vec::new();
        for (i, &data) in has_data.iter().enumerate() {
            let at = i * cs as usize;
            if data && !is_zero(&buf[at..at + cs as usize]) {
                clusters.push(i);
            } else if opts.no_create {
                let guest = start + at as u64;
                q.write_zeroes(guest, cs.min(q.size() - guest))?;
            }
        }
        start += len;
        if !clusters.is_empty() {
            let job = Job {
                seq,
                start: start - len,
                buf,
                clusters,
            };
            if jobs.send(job).is_err() {
                // Every worker stopped; the writer or a worker says why.
                return Ok(());
            }
            seq += 1;
        } else {
            spare = Some(buf);
        }
        progress(start as f64 * 100.0 / src.size as f64);
    }
    Ok(())
}

/// Reads the data extents of `len` bytes at `start` into `buf` and zeroes
/// what else the clusters holding data cover (the rest of `buf` is left
/// as it was); returns, per cluster, whether it holds any data.
fn read_chunk(
    src: &Concat,
    known: &mut Known,
    (start, len): (u64, u64),
    cs: u64,
    buf: &mut [u8],
) -> Result<Vec<bool>> {
    let mut has_data = vec![false; len.div_ceil(cs) as usize];
    let mut zeroes = Vec::new();
    let mut at = start;
    while at < start + len {
        let (kind, n) = src.status_upto(known, at, start + len)?;
        let i = (at - start) as usize;
        if kind == Extent::Data {
            src.read(&mut buf[i..i + n as usize], at)?;
            has_data[i / cs as usize..=(i + n as usize - 1) / cs as usize].fill(true);
        } else {
            zeroes.push((i, i + n as usize));
        }
        at += n;
    }
    // The image may end inside its last cluster: pad it with zeroes.
    let padded = (len.div_ceil(cs) * cs) as usize;
    zeroes.push((len as usize, padded));
    let cs = cs as usize;
    for (from, to) in zeroes {
        for c in (from / cs..to.div_ceil(cs)).filter(|&c| has_data[c]) {
            buf[from.max(c * cs)..to.min((c + 1) * cs)].fill(0);
        }
    }
    Ok(has_data)
}

fn compress_jobs(q: &Qcow2, kind: Compression, jobs: Jobs, done: SyncSender<Packed>) -> Result<()> {
    let mut compressor = Compressor::new(kind).map_err(io(q.path()))?;
    let cs = q.cluster_size() as usize;
    loop {
        let next = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(job) = next else {
            return Ok(());
        };
        let compressed = job
            .clusters
            .iter()
            .map(|&i| compressor.compress(&job.buf[i * cs..(i + 1) * cs]))
            .collect();
        if done.send(Packed { job, compressed }).is_err() {
            return Ok(());
        }
    }
}

/// Stores packed chunks, reordered into guest order when `in_order`, and
/// hands their buffers back to the reader.
fn store(
    q: &Qcow2,
    done: Receiver<Packed>,
    free: Sender<AlignedBuf>,
    in_order: bool,
) -> Result<()> {
    let mut next = 0;
    let mut waiting = BTreeMap::new();
    for p in done {
        if !in_order {
            let _ = free.send(store_chunk(q, p)?);
            continue;
        }
        waiting.insert(p.job.seq, p);
        while let Some(p) = waiting.remove(&next) {
            let _ = free.send(store_chunk(q, p)?);
            next += 1;
        }
    }
    Ok(())
}

/// Writes one chunk's clusters: compressed ones one by one, runs of
/// consecutive ones that did not compress as one write from the buffer.
fn store_chunk(q: &Qcow2, p: Packed) -> Result<AlignedBuf> {
    let cs = q.cluster_size() as usize;
    let job = &p.job;
    let guest = |i: usize| job.start + (i * cs) as u64;
    let mut run: Option<(usize, usize)> = None;
    for (&i, packed) in job.clusters.iter().zip(&p.compressed) {
        match packed {
            Some(data) => {
                write_run(q, job, run.take())?;
                q.write_compressed(guest(i), data)?;
            }
            None => match &mut run {
                Some((_, end)) if *end == i => *end += 1,
                _ => {
                    write_run(q, job, run.take())?;
                    run = Some((i, i + 1));
                }
            },
        }
    }
    write_run(q, job, run)?;
    Ok(p.job.buf)
}

/// Writes clusters `first..end` of a chunk as they are (the image's last
/// cluster only up to its end).
fn write_run(q: &Qcow2, job: &Job, run: Option<(usize, usize)>) -> Result<()> {
    let Some((first, end)) = run else {
        return Ok(());
    };
    let cs = q.cluster_size() as usize;
    let guest = job.start + (first * cs) as u64;
    let len = (((end - first) * cs) as u64).min(q.size() - guest) as usize;
    q.write_at(&job.buf[first * cs..first * cs + len], guest)
}
