//! Helpers shared by the `oxvirt img` integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const OX: &str = env!("CARGO_BIN_EXE_oxvirt");

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tempdir() -> TempDir {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "oxvirt-img-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
}

pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: qemu-img is not installed (scripts/setup.sh installs qemu-utils)");
    }
    ok
}

pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

pub fn ox(args: &[&str]) -> Output {
    let mut full = vec!["img"];
    full.extend_from_slice(args);
    run(OX, &full)
}

pub fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({:?}):\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A deterministic raw image with scattered data extents and holes.
pub fn make_source(path: &Path, size: usize) {
    let mut data = vec![0u8; size];
    let mut x: u32 = 12345;
    let mut at = 0;
    while at < size {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let len = (x as usize % 200_000).min(size - at);
        if !x.is_multiple_of(3) {
            for (i, b) in data[at..at + len].iter_mut().enumerate() {
                // Half compressible text, half noise.
                *b = if x.is_multiple_of(2) {
                    (i % 61) as u8 + 32
                } else {
                    (x.wrapping_mul(i as u32 + 7) >> 13) as u8
                };
            }
        }
        at += len + (x as usize % 300_000);
    }
    std::fs::write(path, data).unwrap();
}

pub fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    ok(run("qemu-io", &args), "qemu-io");
}

/// Patches bytes of a file in place.
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// qemu-img's reading of `img` (as raw) equals oxvirt's, byte for byte.
pub fn assert_reads_same(dir: &Path, img: &Path) {
    let theirs = dir.join("theirs.raw");
    let ours = dir.join("ours.raw");
    ok(
        run("qemu-img", &["convert", "-O", "raw", s(img), s(&theirs)]),
        "qemu-img convert",
    );
    ok(
        ox(&["convert", "-O", "raw", s(img), s(&ours)]),
        "oxvirt convert",
    );
    assert!(
        std::fs::read(&theirs).unwrap() == std::fs::read(&ours).unwrap(),
        "{}: contents differ",
        img.display()
    );
    ok(ox(&["compare", s(img), s(&theirs)]), "oxvirt compare");
}

/// Drops from `ours` the object keys `theirs` lacks, so comparisons hold
/// against older qemu-img versions (7.2 prints fewer fields than 10).
pub fn align_to(ours: &mut serde_json::Value, theirs: &serde_json::Value) {
    match (ours, theirs) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            a.retain(|k, _| b.contains_key(k));
            for (k, v) in a.iter_mut() {
                align_to(v, &b[k]);
            }
        }
        (serde_json::Value::Array(a), serde_json::Value::Array(b)) => {
            for (x, y) in a.iter_mut().zip(b) {
                align_to(x, y);
            }
        }
        _ => {}
    }
}
