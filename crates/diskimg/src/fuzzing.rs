//! One entry point for the fuzz target and its corpus replay test: treat
//! arbitrary bytes as an image file and use it every way a caller may.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::block::BlockDevice;
use crate::image::{probe, Chain, Format};
use crate::qcow2::check::{check, Repair};

/// Bytes read from the start of the disk; hostile sizes are huge.
const READ_LIMIT: u64 = 1 << 20;

fn scratch_file(data: &[u8]) -> Option<PathBuf> {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "diskimg-fuzz-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, data).ok()?;
    Some(path)
}

fn use_device(dev: &dyn BlockDevice) {
    let n = dev.size().min(READ_LIMIT);
    let mut buf = vec![0u8; n as usize];
    let _ = dev.read_at(&mut buf, 0);
    let mut at = 0;
    while at < n {
        match dev.block_status(at, n - at) {
            Ok((_, len)) => at += len.max(1),
            Err(_) => break,
        }
    }
}

/// Opens `data` as an image (never following backing files), reads it,
/// checks it, repairs a copy and writes to it. Errors are expected; a
/// panic, a hang or a runaway allocation is the bug being hunted.
pub fn exercise(data: &[u8]) {
    let Some(path) = scratch_file(data) else {
        return;
    };
    let format = probe(&path).unwrap_or(Format::Raw);
    if let Ok(dev) = Chain::without_backing().open(&path, true, Some(format)) {
        use_device(dev.as_ref());
    }
    if format == Format::Qcow2 {
        if let Ok(q) = Chain::without_backing().open_qcow2(&path, true) {
            let _ = check(&q, None);
        }
        if let Ok(q) = Chain::without_backing().open_qcow2(&path, false) {
            let _ = check(&q, Some(Repair::All));
            let _ = q.write_at(&[0xa5; 4096], 0);
            let _ = q.write_zeroes(0, q.size().min(1 << 16));
            let _ = crate::ops::info::info(&path, Some(Format::Qcow2));
        }
    }
    let _ = std::fs::remove_file(&path);
}
