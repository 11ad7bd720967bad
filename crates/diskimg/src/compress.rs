//! Cluster compression as qcow2 stores it: raw deflate (no zlib header,
//! 4 KiB window, as QEMU writes it) or a zstd frame.

use std::io::Read;

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

use crate::qcow2::header::Compression;

/// A cluster compressor that keeps its (costly to set up) state between
/// clusters; one per compressing thread.
pub enum Compressor {
    Zlib {
        /// What QEMU uses: the default level.
        level6: Box<Compress>,
        /// A quick first try for clusters that look incompressible.
        level1: Box<Compress>,
    },
    Zstd(Box<zstd::bulk::Compressor<'static>>),
}

/// Bits per byte above which a cluster's byte histogram says deflate can
/// gain little from Huffman coding alone (random or encrypted data).
const HIGH_ENTROPY: f64 = 7.9;

impl Compressor {
    pub fn new(kind: Compression) -> std::io::Result<Compressor> {
        Ok(match kind {
            Compression::Zlib => Compressor::Zlib {
                level6: raw_deflate(flate2::Compression::default()),
                level1: raw_deflate(flate2::Compression::fast()),
            },
            Compression::Zstd => Compressor::Zstd(Box::new(zstd::bulk::Compressor::new(0)?)),
        })
    }

    /// Compresses one cluster; `None` when the result would not be
    /// smaller than the cluster (QEMU then stores it uncompressed). The
    /// output buffer is one byte short of the cluster, so incompressible
    /// data stops the compressor as soon as it fills.
    ///
    /// Deflate spends most of its time on data it cannot compress, so a
    /// cluster whose bytes are near uniformly distributed is first tried
    /// at level 1; only if that fits does the default level run.
    pub fn compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        match self {
            Compressor::Zlib { level6, level1 } => {
                if entropy(data) > HIGH_ENTROPY {
                    deflate(level1, flate2::Compression::fast(), data)?;
                }
                deflate(level6, flate2::Compression::default(), data)
            }
            Compressor::Zstd(c) => {
                let mut out = Vec::with_capacity(data.len().saturating_sub(1));
                c.compress_to_buffer(data, &mut out).ok().map(|_| out)
            }
        }
    }
}

/// Raw deflate with a 4 KiB window, as QEMU writes it.
fn raw_deflate(level: flate2::Compression) -> Box<Compress> {
    Box::new(Compress::new_with_window_bits(level, false, 12))
}

/// Deflates one cluster with `c`, leaving `c` ready for the next one.
fn deflate(c: &mut Box<Compress>, level: flate2::Compression, data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len().saturating_sub(1));
    let finished = matches!(
        c.compress_vec(data, &mut out, FlushCompress::Finish),
        Ok(Status::StreamEnd)
    );
    if finished {
        c.reset();
        return Some(out);
    }
    // zlib-rs 0.6 keeps a stream's pending output across reset() when the
    // stream did not finish (and later panics on it): start afresh.
    *c = raw_deflate(level);
    None
}

/// Shannon entropy of the byte values, in bits per byte.
fn entropy(data: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let n = data.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// Inflates compressed bytes (possibly followed by unrelated bytes up to
/// the sector end) into exactly `out.len()` bytes.
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        Compression::Zlib => {
            let mut d = Decompress::new(false);
            match d.decompress(input, out, FlushDecompress::Finish) {
                Ok(_) if d.total_out() == out.len() as u64 => Ok(()),
                Ok(_) => Err(format!(
                    "deflate data inflates to {} bytes, not {}",
                    d.total_out(),
                    out.len()
                )),
                Err(e) => Err(format!("deflate data: {e}")),
            }
        }
        Compression::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| format!("zstd: {e}"))?
                .single_frame();
            dec.read_exact(out).map_err(|e| format!("zstd data: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, mut x: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn round_trip(kind: Compression, data: &[u8]) -> Option<usize> {
        let packed = Compressor::new(kind).unwrap().compress(data)?;
        let mut out = vec![0u8; data.len()];
        decompress(kind, &packed, &mut out).unwrap();
        assert!(out == data, "{kind:?} round trip differs");
        Some(packed.len())
    }

    #[test]
    fn random_clusters_are_stored_uncompressed() {
        let data = random(65536, 7);
        assert!(entropy(&data) > HIGH_ENTROPY);
        assert_eq!(round_trip(Compression::Zlib, &data), None);
        assert_eq!(round_trip(Compression::Zstd, &data), None);
    }

    #[test]
    fn high_entropy_data_that_repeats_within_the_window_still_compresses() {
        let block = random(3800, 9);
        let data: Vec<u8> = block.iter().copied().cycle().take(65536).collect();
        assert!(entropy(&data) > HIGH_ENTROPY, "{}", entropy(&data));
        let n = round_trip(Compression::Zlib, &data).expect("repeats compress");
        assert!(n < 8000, "{n} bytes");
    }

    #[test]
    fn one_compressor_serves_many_clusters() {
        let mut c = Compressor::new(Compression::Zlib).unwrap();
        for i in 0..4u8 {
            let data: Vec<u8> = (0..65536u32).map(|j| (j % 251) as u8 ^ i).collect();
            let packed = c.compress(&data).expect("compressible");
            let mut out = vec![0u8; data.len()];
            decompress(Compression::Zlib, &packed, &mut out).unwrap();
            assert!(out == data, "cluster {i}");
        }
    }

    #[test]
    fn small_clusters_that_do_not_fit_leave_the_compressor_usable() {
        // Runs of text and of noise cut into 512-byte clusters: some fit,
        // some do not; a compressor that failed must still compress the
        // next cluster correctly (zlib-rs 0.6 panicked here after reset()).
        let mut data = vec![0u8; 1 << 20];
        let (mut x, mut at) = (12345u32, 0);
        while at < data.len() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let len = (x as usize % 200_000).min(data.len() - at);
            for (i, b) in data[at..at + len].iter_mut().enumerate() {
                *b = if x % 2 == 0 {
                    (i % 61) as u8 + 32
                } else {
                    (x.wrapping_mul(i as u32 + 7) >> 13) as u8
                };
            }
            at += len;
        }
        let mut c = Compressor::new(Compression::Zlib).unwrap();
        for cluster in data.chunks(512) {
            if let Some(packed) = c.compress(cluster) {
                let mut out = vec![0u8; 512];
                decompress(Compression::Zlib, &packed, &mut out).unwrap();
                assert!(out == cluster, "round trip differs");
            }
        }
    }
}
