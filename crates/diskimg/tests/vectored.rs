//! `read_vectored_at` / `write_vectored_at` (what virtio-blk uses to move
//! data straight between guest memory and the image): random scatter lists,
//! some page-aligned (the direct path, O_DIRECT included), some not (the
//! bounce path), on raw and on a qcow2 overlay over a compressed backing
//! file, buffered and O_DIRECT; every read is checked against a model and
//! the result with `qemu-img compare`.

mod common;

use std::path::Path;

use common::{qemu_ok, Rng};
use diskimg::{open_with, BlockDevice, Format, IoBuf, OpenOptions};

const SIZE: u64 = 4 << 20;
const PAGE: usize = 4096;

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("oxvirt-vectored")
        .tempdir_in("/var/tmp")
        .expect("temp dir in /var/tmp")
}

fn options(format: Format, direct: bool) -> OpenOptions {
    OpenOptions {
        read_only: false,
        format: Some(format),
        direct,
    }
}

/// Page-aligned memory split into a scatter list of `len` bytes: whole
/// pages if `aligned`, else pieces of random (odd) sizes at odd addresses.
struct Scatter {
    mem: Vec<u8>,
    pieces: Vec<(usize, usize)>,
}

impl Scatter {
    fn new(rng: &mut Rng, len: usize, aligned: bool) -> Scatter {
        let mut mem = vec![0u8; 2 * len + 2 * PAGE];
        let base = mem.as_mut_ptr().align_offset(PAGE);
        let mut pieces = Vec::new();
        let (mut at, mut left) = (base, len);
        while left > 0 {
            let n = if aligned {
                (PAGE * (rng.below(8) as usize + 1)).min(left)
            } else {
                (rng.below(3 * PAGE as u64) as usize + 1).min(left)
            };
            pieces.push((at, n));
            // Gaps between pieces, so a wrong length shows up as a wrong byte.
            at += n + if aligned {
                PAGE
            } else {
                1 + rng.below(7) as usize
            };
            left -= n;
        }
        assert!(at <= mem.len(), "scatter list outgrew its memory");
        Scatter { mem, pieces }
    }

    fn bufs(&mut self) -> Vec<IoBuf<'_>> {
        let base = self.mem.as_mut_ptr();
        self.pieces
            .iter()
            // SAFETY: every piece lies inside `mem`, borrowed mutably for
            // as long as the IoBufs live.
            .map(|&(at, n)| unsafe { IoBuf::new(base.add(at), n) })
            .collect()
    }

    fn contents(&self) -> Vec<u8> {
        self.pieces
            .iter()
            .flat_map(|&(at, n)| self.mem[at..at + n].iter().copied())
            .collect()
    }

    fn fill(&mut self, data: &[u8]) {
        let mut done = 0;
        for &(at, n) in &self.pieces {
            self.mem[at..at + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }
}

/// Random vectored writes and reads, half page-aligned, checked against
/// `model`, then the whole image read back with `read_at`.
fn exercise(img: &dyn BlockDevice, model: &mut [u8], seed: u64, steps: usize) {
    let mut rng = Rng(seed);
    let size = model.len() as u64;
    for step in 0..steps {
        let aligned = step % 2 == 0;
        let (off, len) = if aligned {
            let off = rng.below(size / PAGE as u64) * PAGE as u64;
            (off, ((rng.below(64) + 1) * PAGE as u64).min(size - off))
        } else {
            let off = rng.below(size);
            (off, (rng.below(200_000) + 1).min(size - off))
        };
        let (lo, hi) = (off as usize, (off + len) as usize);
        if rng.below(2) == 0 {
            let data: Vec<u8> = (0..len)
                .map(|i| (step as u8).wrapping_mul(29) ^ (i as u8) | 1)
                .collect();
            let mut s = Scatter::new(&mut rng, len as usize, aligned);
            s.fill(&data);
            img.write_vectored_at(&s.bufs(), off).unwrap();
            model[lo..hi].copy_from_slice(&data);
        }
        let mut s = Scatter::new(&mut rng, len as usize, aligned);
        img.read_vectored_at(&s.bufs(), off).unwrap();
        assert!(
            s.contents() == model[lo..hi],
            "step {step}: vectored read of {len} bytes at {off} differs from the model"
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

fn raw(direct: bool, seed: u64) {
    let dir = scratch();
    let path = dir.path().join("disk.raw");
    let mut model: Vec<u8> = (0..SIZE).map(|i| (i / 512) as u8).collect();
    std::fs::write(&path, &model).unwrap();
    {
        let img = open_with(&path, &options(Format::Raw, direct)).unwrap();
        exercise(img.as_ref(), &mut model, seed, 200);
    }
    assert!(std::fs::read(&path).unwrap() == model, "file differs");
    qemu_compare(&path, "raw", &model, dir.path());
}

#[test]
fn vectored_raw_matches_the_model() {
    raw(false, 21);
}

#[test]
fn vectored_raw_direct_matches_the_model() {
    raw(true, 22);
}

#[test]
fn vectored_read_past_the_end_of_a_short_raw_file_reads_zeroes() {
    let dir = scratch();
    let path = dir.path().join("short.raw");
    // 1000 bytes: the disk is 1024 (whole sectors), the tail reads as zeroes.
    std::fs::write(&path, vec![0x5a; 1000]).unwrap();
    let img = open_with(&path, &options(Format::Raw, false)).unwrap();
    let mut s = Scatter::new(&mut Rng(1), 1024, false);
    s.mem.fill(0xff);
    img.read_vectored_at(&s.bufs(), 0).unwrap();
    let got = s.contents();
    assert!(got[..1000].iter().all(|&b| b == 0x5a));
    assert!(
        got[1000..].iter().all(|&b| b == 0),
        "tail past the file end"
    );
    let past = img.read_vectored_at(&s.bufs(), 512).unwrap_err();
    assert!(past.to_string().contains("short.raw"), "{past}");
}

fn qcow2_overlay(direct: bool, seed: u64) {
    let dir = scratch();
    let base_raw = dir.path().join("base.raw");
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let mut model: Vec<u8> = (0..SIZE).map(|i| (i / 4096) as u8 | 0x40).collect();
    std::fs::write(&base_raw, &model).unwrap();
    // A compressed backing file: reads through the overlay's unallocated
    // clusters take the bounce path, allocated ones the direct path.
    let (b_raw, b) = (base_raw.to_str().unwrap(), base.to_str().unwrap());
    if !qemu_ok(&["convert", "-c", "-O", "qcow2", b_raw, b]) {
        eprintln!("SKIP: qemu-img is not installed; the qcow2 vectored test needs it");
        return;
    }
    let t = top.to_str().unwrap();
    assert!(qemu_ok(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        t
    ]));
    {
        let img = open_with(&top, &options(Format::Qcow2, direct)).unwrap();
        exercise(img.as_ref(), &mut model, seed, 200);
    }
    common::assert_qemu_clean(&top);
    qemu_compare(&top, "qcow2", &model, dir.path());
}

#[test]
fn vectored_qcow2_overlay_matches_the_model() {
    qcow2_overlay(false, 31);
}

#[test]
fn vectored_qcow2_overlay_direct_matches_the_model() {
    qcow2_overlay(true, 32);
}
