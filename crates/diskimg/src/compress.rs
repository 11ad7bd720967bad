//! Cluster compression as qcow2 stores it: raw deflate (no zlib header,
//! 4 KiB window, as QEMU writes it) or a zstd frame.

use std::io::Read;

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

use crate::qcow2::header::Compression;

/// Compresses one cluster; `None` when the result would not be smaller
/// than the cluster (QEMU then stores the cluster uncompressed).
pub fn compress(kind: Compression, data: &[u8]) -> Option<Vec<u8>> {
    let limit = data.len() - 1;
    let out = match kind {
        Compression::Zlib => {
            let mut c = Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
            let mut out = Vec::with_capacity(data.len());
            match c.compress_vec(data, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) => out,
                _ => return None,
            }
        }
        Compression::Zstd => zstd::bulk::compress(data, 0).ok()?,
    };
    (out.len() <= limit).then_some(out)
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
