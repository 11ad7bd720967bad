//! Compressed conversion as a pipeline: the calling thread reads the
//! source, worker threads compress clusters (each with its own reusable
//! compressor), and one writer thread stores them, in guest order unless
//! `-W`. Reading, compressing and writing overlap.

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use super::{is_zero, Concat, ConvertOptions, Extent, CHUNK};
use crate::block::BlockDevice;
use crate::compress::Compressor;
use crate::error::{io, Error, Result};
use crate::qcow2::header::Compression;
use crate::qcow2::Qcow2;

/// A cluster to compress, numbered in guest order.
struct Job {
    seq: u64,
    guest: u64,
    data: Vec<u8>,
}

/// A cluster ready to store.
struct Packed {
    seq: u64,
    guest: u64,
    data: Vec<u8>,
    compressed: bool,
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
    let (job_tx, job_rx) = sync_channel::<Job>(workers * 4);
    let (done_tx, done_rx) = sync_channel::<Packed>(workers * 4);
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
        let writer = s.spawn(|| store(q, done_rx, !opts.out_of_order));
        let read = read_clusters(src, q, opts, job_tx, progress);
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

/// Reads the source chunk by chunk and queues every cluster that is not
/// all zeroes (with `-n`, zero clusters are zeroed in the target here).
fn read_clusters(
    src: &Concat,
    q: &Qcow2,
    opts: &ConvertOptions,
    jobs: SyncSender<Job>,
    progress: &mut dyn FnMut(f64),
) -> Result<()> {
    let cs = q.cluster_size();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut seq = 0;
    let mut start = 0;
    while start < src.size {
        let len = (src.size - start).min(CHUNK);
        let padded = &mut buf[..(len.div_ceil(cs) * cs) as usize];
        padded.fill(0);
        let mut at = start;
        while at < start + len {
            let (kind, n) = src.status(at, start + len - at)?;
            if kind == Extent::Data {
                let i = (at - start) as usize;
                src.read(&mut padded[i..i + n as usize], at)?;
            }
            at += n;
        }
        for (i, c) in padded.chunks(cs as usize).enumerate() {
            let guest = start + i as u64 * cs;
            if is_zero(c) {
                if opts.no_create {
                    q.write_zeroes(guest, cs.min(q.size() - guest))?;
                }
                continue;
            }
            let job = Job {
                seq,
                guest,
                data: c.to_vec(),
            };
            if jobs.send(job).is_err() {
                // Every worker stopped; the writer or a worker says why.
                return Ok(());
            }
            seq += 1;
        }
        start += len;
        progress(start as f64 * 100.0 / src.size as f64);
    }
    Ok(())
}

fn compress_jobs(q: &Qcow2, kind: Compression, jobs: Jobs, done: SyncSender<Packed>) -> Result<()> {
    let mut compressor = Compressor::new(kind).map_err(io(q.path()))?;
    loop {
        let next = jobs.lock().unwrap_or_else(|e| e.into_inner()).recv();
        let Ok(job) = next else {
            return Ok(());
        };
        let packed = match compressor.compress(&job.data) {
            Some(data) => Packed {
                seq: job.seq,
                guest: job.guest,
                data,
                compressed: true,
            },
            None => Packed {
                seq: job.seq,
                guest: job.guest,
                data: job.data,
                compressed: false,
            },
        };
        if done.send(packed).is_err() {
            return Ok(());
        }
    }
}

/// Stores packed clusters, reordered into guest order when `in_order`.
fn store(q: &Qcow2, done: Receiver<Packed>, in_order: bool) -> Result<()> {
    let mut next = 0;
    let mut waiting = BTreeMap::new();
    let mut run = RawRun::default();
    for p in done {
        if !in_order {
            run.put(q, p)?;
            continue;
        }
        waiting.insert(p.seq, p);
        while let Some(p) = waiting.remove(&next) {
            run.put(q, p)?;
            next += 1;
        }
    }
    run.flush(q)
}

/// Consecutive clusters that did not compress, written as one run.
#[derive(Default)]
struct RawRun {
    guest: u64,
    data: Vec<u8>,
}

impl RawRun {
    fn put(&mut self, q: &Qcow2, p: Packed) -> Result<()> {
        if p.compressed {
            return q.write_compressed(p.guest, &p.data);
        }
        let joins = !self.data.is_empty()
            && self.guest + self.data.len() as u64 == p.guest
            && (self.data.len() as u64) < CHUNK;
        if !joins {
            self.flush(q)?;
            self.guest = p.guest;
        }
        self.data.extend_from_slice(&p.data);
        Ok(())
    }

    fn flush(&mut self, q: &Qcow2) -> Result<()> {
        if self.data.is_empty() {
            return Ok(());
        }
        let len = (self.data.len() as u64).min(q.size() - self.guest) as usize;
        q.write_at(&self.data[..len], self.guest)?;
        self.data.clear();
        Ok(())
    }
}
