//! Uncompressed conversion: `-m` reader threads each read a chunk of the
//! source into a buffer from a shared pool and work out what to write
//! (runs of data, runs of zeroes), and the calling thread writes the
//! chunks, in guest order unless `-W`, and hands their buffers back.
//! Buffered writes to one file are serialised by the kernel anyway, so
//! the writer does nothing else: reading and the zero scan never hold up
//! the next write, and a copy from a cached source runs at the speed of
//! the target's writes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::Mutex;

use super::{is_zero, Concat, ConvertOptions, Extent, Known, CHUNK};
use crate::block::BlockDevice;
use crate::buf::AlignedBuf;
use crate::error::{Error, Result};

/// Buffers beyond one per reader: chunks read ahead of the writer.
const AHEAD: usize = 2;

/// A chunk read and ready to write.
struct Chunk {
    buf: AlignedBuf,
    /// The chunk's first guest offset: `buf[0]` holds its byte.
    start: u64,
    steps: Vec<Step>,
}

/// One write of the target: guest offset, length, and what goes there.
#[derive(Clone, Copy)]
struct Step {
    at: u64,
    len: u64,
    put: Put,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Put {
    /// The bytes in the chunk's buffer.
    Data,
    /// Zeroes, as the target stores them best (a hole, a zero cluster).
    Zeroes,
    /// Zero bytes, allocated: `-S 0` asks for a fully allocated target.
    Filled,
}

/// A reader's outcome for one chunk it claimed, numbered in guest order.
type Read = (u64, Result<Chunk>);

pub(super) fn copy_plain(
    src: &Concat,
    dst: &dyn BlockDevice,
    dest: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(f64),
) -> Result<()> {
    let readers = opts.threads.max(1);
    let plan = Mutex::new(Plan {
        next: 0,
        known: None,
    });
    let (free_tx, free_rx) = channel();
    for _ in 0..readers + AHEAD {
        let _ = free_tx.send(AlignedBuf::page(CHUNK as usize));
    }
    let free = Mutex::new(free_rx);
    let (read_tx, read_rx) = sync_channel(readers + AHEAD);
    std::thread::scope(|s| {
        let reading: Vec<_> = (0..readers)
            .map(|_| {
                let tx = read_tx.clone();
                s.spawn(|| read_chunks(src, opts, &plan, &free, tx))
            })
            .collect();
        drop(read_tx);
        let mut result = write_chunks(src, dst, opts, read_rx, free_tx, progress);
        for h in reading {
            if h.join().is_err() {
                result = result.and(Err(Error::Usage(format!(
                    "{}: a copying thread panicked",
                    dest.display()
                ))));
            }
        }
        result
    })
}

/// Hands out the chunks in order, with their extents, so that the source
/// is asked about each extent once, not once per reader that meets it.
struct Plan {
    /// The number of the next chunk.
    next: u64,
    known: Known,
}

/// A claimed chunk: its number, first guest offset and extents.
type Claim = (u64, u64, Result<Vec<(u64, u64, Extent)>>);

impl Plan {
    /// The next chunk; None past the end.
    fn claim(&mut self, src: &Concat) -> Option<Claim> {
        let seq = self.next;
        let start = seq * CHUNK;
        if start >= src.size {
            return None;
        }
        self.next += 1;
        let end = (src.size - start).min(CHUNK) + start;
        Some((seq, start, self.extents(src, start, end)))
    }

    fn extents(&mut self, src: &Concat, start: u64, end: u64) -> Result<Vec<(u64, u64, Extent)>> {
        let mut extents = Vec::new();
        let mut at = start;
        while at < end {
            let (kind, n) = src.status_upto(&mut self.known, at, end)?;
            extents.push((at, n, kind));
            at += n;
        }
        Ok(extents)
    }
}

/// Sends the writer an error for the chunk a reader holds if the reader
/// unwinds, so that the writer does not wait for it forever.
struct SendOnUnwind<'a> {
    seq: Option<u64>,
    tx: &'a SyncSender<Read>,
}

impl Drop for SendOnUnwind<'_> {
    fn drop(&mut self) {
        if let (Some(seq), true) = (self.seq, std::thread::panicking()) {
            let panicked = Error::Usage("a copying thread panicked".into());
            let _ = self.tx.send((seq, Err(panicked)));
        }
    }
}

/// One reader: takes a free buffer, claims the next chunk, reads it and
/// sends it on, until the source ends or the writer stops.
fn read_chunks(
    src: &Concat,
    opts: &ConvertOptions,
    plan: &Mutex<Plan>,
    free: &Mutex<Receiver<AlignedBuf>>,
    tx: SyncSender<Read>,
) {
    let mut held = SendOnUnwind { seq: None, tx: &tx };
    loop {
        // The buffer first: every claimed chunk then has one, so the
        // chunk the writer waits for is never stuck behind a full pool.
        let Ok(mut buf) = free.lock().unwrap_or_else(|e| e.into_inner()).recv() else {
            return; // the writer stopped
        };
        let claimed = plan.lock().unwrap_or_else(|e| e.into_inner()).claim(src);
        let Some((seq, start, extents)) = claimed else {
            return;
        };
        held.seq = Some(seq);
        let steps = extents.and_then(|e| read_chunk(src, opts, start, &e, &mut buf));
        let failed = steps.is_err();
        let chunk = steps.map(|steps| Chunk { buf, start, steps });
        held.seq = None;
        if tx.send((seq, chunk)).is_err() || failed {
            return;
        }
    }
}

/// Reads the data extents of the chunk at `start` into `buf` and lists
/// the writes that copy it.
fn read_chunk(
    src: &Concat,
    opts: &ConvertOptions,
    start: u64,
    extents: &[(u64, u64, Extent)],
    buf: &mut [u8],
) -> Result<Vec<Step>> {
    let explicit_zeroes = src.explicit_zeroes(opts);
    let zero_put = if opts.min_sparse == 0 && !src.top_only {
        Some(Put::Filled)
    } else {
        explicit_zeroes.then_some(Put::Zeroes)
    };
    let mut steps = Vec::new();
    for &(at, len, kind) in extents {
        match kind {
            Extent::Backing => {}
            Extent::Zero => steps.extend(zero_put.map(|put| Step { at, len, put })),
            Extent::Data => {
                let i = (at - start) as usize;
                let data = &mut buf[i..i + len as usize];
                src.read(data, at)?;
                sparse_steps(data, at, opts.min_sparse, explicit_zeroes, &mut steps);
            }
        }
    }
    Ok(steps)
}

/// The writes for `data` at guest `at`: aligned zero runs of at least
/// `min_sparse` are skipped (or written as zeroes, where
/// `explicit_zeroes`).
fn sparse_steps(
    data: &[u8],
    at: u64,
    min_sparse: u64,
    explicit_zeroes: bool,
    steps: &mut Vec<Step>,
) {
    let block = min_sparse as usize;
    if block == 0 {
        let len = data.len() as u64;
        steps.push(Step {
            at,
            len,
            put: Put::Data,
        });
        return;
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
        if !kind || explicit_zeroes {
            steps.push(Step {
                at: at + i as u64,
                len: (j - i) as u64,
                put: if kind { Put::Zeroes } else { Put::Data },
            });
        }
        i = j;
    }
}

/// Writes the chunks as they come, reordered into guest order unless
/// `-W`, and hands their buffers back. Returns the first error in guest
/// order (any order with `-W`); the readers stop when it returns.
fn write_chunks(
    src: &Concat,
    dst: &dyn BlockDevice,
    opts: &ConvertOptions,
    read: Receiver<Read>,
    free: Sender<AlignedBuf>,
    progress: &mut dyn FnMut(f64),
) -> Result<()> {
    let total = src.size.div_ceil(CHUNK);
    let mut next = 0;
    let mut written = 0;
    let mut waiting = BTreeMap::new();
    let mut zeroes = Vec::new();
    for (seq, chunk) in read {
        if opts.out_of_order {
            let _ = free.send(write_chunk(dst, chunk?, &mut zeroes)?);
            written += 1;
        } else {
            waiting.insert(seq, chunk);
            while let Some(chunk) = waiting.remove(&next) {
                let _ = free.send(write_chunk(dst, chunk?, &mut zeroes)?);
                next += 1;
                written += 1;
            }
        }
        progress((written * CHUNK).min(src.size) as f64 * 100.0 / src.size as f64);
    }
    if written < total {
        return Err(Error::Usage(format!(
            "conversion stopped after {written} of {total} chunks: a reader ended early"
        )));
    }
    Ok(())
}

fn write_chunk(dst: &dyn BlockDevice, chunk: Chunk, zeroes: &mut Vec<u8>) -> Result<AlignedBuf> {
    for s in &chunk.steps {
        match s.put {
            Put::Data => {
                let i = (s.at - chunk.start) as usize;
                dst.write_at(&chunk.buf[i..i + s.len as usize], s.at)?;
            }
            Put::Zeroes => dst.write_zeroes(s.at, s.len)?,
            Put::Filled => {
                // A step lies in one chunk, so one chunk of zeroes will do.
                zeroes.resize(s.len as usize, 0);
                dst.write_at(&zeroes[..s.len as usize], s.at)?;
            }
        }
    }
    Ok(chunk.buf)
}
