//! O_DIRECT (`cache=none`): raw and qcow2 images (with a backing chain)
//! opened direct on a real ext4 file under /var/tmp take unaligned offsets,
//! lengths and buffers, and end up byte-identical to an in-memory model as
//! `qemu-img compare` sees it; qcow2 images stay clean for `qemu-img check`.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_qemu_clean, qemu_ok, Rng};
use diskimg::{open_with, BlockDevice, Error, Format, OpenOptions};

const SIZE: u64 = 4 << 20;

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("oxvirt-direct")
        .tempdir_in("/var/tmp")
        .expect("temp dir in /var/tmp")
}

fn direct(format: Format) -> OpenOptions {
    OpenOptions {
        read_only: false,
        format: Some(format),
        direct: true,
    }
}

/// A buffer of `len` bytes starting at an address that is a multiple of
/// 4096 plus `misalign`.
fn buffer(len: usize, misalign: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + 8192];
    let at = v.as_ptr().align_offset(4096) + misalign;
    (v, at)
}

/// Random writes and write_zeroes, half of them aligned (offset, length and
/// buffer), half not; reads at random offsets are checked on the way.
fn exercise(img: &dyn BlockDevice, model: &mut [u8], seed: u64, steps: usize) {
    let mut rng = Rng(seed);
    let size = model.len() as u64;
    for step in 0..steps {
        let aligned = rng.below(2) == 0;
        let (off, len) = if aligned {
            let off = rng.below(size / 4096) * 4096;
            (off, ((rng.below(64) + 1) * 4096).min(size - off))
        } else {
            let off = rng.below(size);
            (off, (rng.below(200_000) + 1).min(size - off))
        };
        let (lo, hi) = (off as usize, (off + len) as usize);
        if rng.below(8) == 0 {
            img.write_zeroes(off, len).unwrap();
            model[lo..hi].fill(0);
        } else {
            let (mut v, at) = buffer(len as usize, if aligned { 0 } else { 1 + step % 511 });
            let data = &mut v[at..at + len as usize];
            for (i, b) in data.iter_mut().enumerate() {
                *b = (step as u8).wrapping_mul(37) ^ (i as u8) | 1;
            }
            img.write_at(data, off).unwrap();
            model[lo..hi].copy_from_slice(data);
        }
        let roff = rng.below(size);
        let rlen = (rng.below(100_000) + 1).min(size - roff) as usize;
        let (mut v, at) = buffer(rlen, (step % 3) * 7);
        let back = &mut v[at..at + rlen];
        img.read_at(back, roff).unwrap();
        assert!(
            back == &model[roff as usize..roff as usize + rlen],
            "step {step}: read of {rlen} bytes at {roff} differs from the model"
        );
    }
    img.flush().unwrap();
    let mut all = vec![0u8; model.len()];
    img.read_at(&mut all, 0).unwrap();
    assert!(all == model, "whole-image read differs from the model");
}

fn qemu_compare(image: &Path, format: &str, model: &[u8], dir: &Path) {
    let dump = dir.join("model.dump");
    std::fs::write(&dump, model).unwrap();
    if qemu_ok(&["--version"]) {
        assert!(
            qemu_ok(&[
                "compare",
                "-f",
                format,
                "-F",
                "raw",
                image.to_str().unwrap(),
                dump.to_str().unwrap()
            ]),
            "qemu-img compare: {} differs from the model",
            image.display()
        );
    }
}

/// The files this process holds open with O_DIRECT, from /proc/self/fdinfo.
fn direct_fds() -> Vec<PathBuf> {
    const O_DIRECT: u32 = 0o40000;
    let mut out = Vec::new();
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let info = std::fs::read_to_string(format!(
            "/proc/self/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if flags & O_DIRECT != 0 {
            out.push(target);
        }
    }
    out
}

#[test]
fn direct_raw_unaligned_io_matches_the_model() {
    let dir = scratch();
    let path = dir.path().join("disk.raw");
    // Not a whole number of 4 KiB blocks: the last block is partial.
    let size = SIZE + 3 * 512;
    let mut model: Vec<u8> = (0..size).map(|i| (i / 512) as u8).collect();
    std::fs::write(&path, &model).unwrap();
    {
        let img = open_with(&path, &direct(Format::Raw)).unwrap();
        assert_eq!(direct_fds(), vec![path.clone()]);
        exercise(img.as_ref(), &mut model, 7, 300);
        let tail = size - 100;
        img.write_at(&[0xaa; 100], tail).unwrap();
        model[tail as usize..].fill(0xaa);
    }
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        size,
        "a read-modify-write of the last block changed the file size"
    );
    assert!(std::fs::read(&path).unwrap() == model, "file differs");
    qemu_compare(&path, "raw", &model, dir.path());
}

fn qcow2_chain(cluster_size: &str, extra: &str, seed: u64, steps: usize) {
    let dir = scratch();
    let base_raw = dir.path().join("base.raw");
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let mut model: Vec<u8> = (0..SIZE).map(|i| (i / 4096) as u8 | 0x40).collect();
    std::fs::write(&base_raw, &model).unwrap();
    if !qemu_ok(&[
        "convert",
        "-O",
        "qcow2",
        base_raw.to_str().unwrap(),
        base.to_str().unwrap(),
    ]) {
        return;
    }
    let opts = format!("cluster_size={cluster_size}{extra}");
    assert!(qemu_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &opts,
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]));
    {
        let img = open_with(&top, &direct(Format::Qcow2)).unwrap();
        let mut fds = direct_fds();
        fds.sort();
        assert_eq!(
            fds,
            vec![base.clone(), top.clone()],
            "files opened O_DIRECT"
        );
        exercise(img.as_ref(), &mut model, seed, steps);
    }
    assert_qemu_clean(&top);
    qemu_compare(&top, "qcow2", &model, dir.path());
}

#[test]
fn direct_qcow2_overlay_64k_clusters_matches_the_model() {
    qcow2_chain("65536", "", 11, 200);
}

#[test]
fn direct_qcow2_overlay_512_byte_clusters_matches_the_model() {
    qcow2_chain("512", "", 12, 60);
}

#[test]
fn direct_qcow2_overlay_extended_l2_matches_the_model() {
    qcow2_chain("65536", ",extended_l2=on", 13, 200);
}

#[test]
fn direct_open_on_a_filesystem_without_o_direct_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "ramfs", "ramfs"])
        .arg(dir.path())
        .status();
    if !status.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var("OXVIRT_REQUIRE_KVM").as_deref() != Ok("1"),
            "mounting ramfs failed (needs root)"
        );
        eprintln!("SKIP: cannot mount ramfs (needs root) to test a filesystem without O_DIRECT");
        return;
    }
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, vec![0u8; 65536]).unwrap();
    let err = open_with(&path, &direct(Format::Raw)).err();
    let _ = std::process::Command::new("umount")
        .arg(dir.path())
        .status();
    match err {
        Some(e @ Error::Unsupported { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("disk.raw"), "{msg}");
            assert!(msg.contains("needs O_DIRECT"), "{msg}");
        }
        other => panic!("expected an O_DIRECT error, got {other:?}"),
    }
}
