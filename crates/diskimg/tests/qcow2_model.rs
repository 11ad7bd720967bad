//! Randomized model test: random writes, discards and write_zeroes on a
//! qcow2 image (with and without a backing file) against an in-memory
//! copy, read back through oxvirt, then `qemu-img check` and
//! `qemu-img compare` against a raw dump of the model.

mod common;

use std::path::Path;

use common::{assert_qemu_clean, qemu_ok, Rng};
use diskimg::qcow2::create::{create, CreateOptions};
use diskimg::qcow2::header::Compression;

const SIZE: u64 = 4 << 20;

fn run_model(dir: &Path, opts: CreateOptions, backing: bool, seed: u64) {
    let mut rng = Rng(seed);
    let mut model = vec![0u8; SIZE as usize];
    let mut opts = CreateOptions { size: SIZE, ..opts };
    if backing {
        let base = dir.join("base.raw");
        for (i, b) in model.iter_mut().enumerate() {
            *b = (i / 4096) as u8 | 1;
        }
        std::fs::write(&base, &model).unwrap();
        opts.backing_file = Some("base.raw".into());
        opts.backing_format = Some("raw".into());
    }
    let path = dir.join("model.qcow2");
    create(&path, &opts).unwrap();
    let cs = opts.cluster_size;
    {
        let img = diskimg::open(&path, false, None).unwrap();
        for step in 0..300 {
            let off = rng.below(SIZE);
            let len = (rng.below(3 * cs) + 1).min(SIZE - off);
            match rng.below(10) {
                0 => {
                    img.write_zeroes(off, len).unwrap();
                    model[off as usize..(off + len) as usize].fill(0);
                }
                1 => {
                    img.discard(off, len).unwrap();
                    // Whole clusters read as zeroes after a discard; partial ones keep their data.
                    let first = off.div_ceil(cs) * cs;
                    let last = ((off + len) / cs * cs).max(first);
                    let last = if off + len == SIZE { SIZE } else { last };
                    if !backing || opts.version >= 3 {
                        model[first as usize..last as usize].fill(0);
                    }
                }
                _ => {
                    let fill = (step as u8).wrapping_mul(31) | 0x80;
                    let data: Vec<u8> = (0..len).map(|i| fill ^ (i as u8)).collect();
                    img.write_at(&data, off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
            }
            if step % 50 == 0 {
                let mut back = vec![0u8; SIZE as usize];
                img.read_at(&mut back, 0).unwrap();
                assert!(back == model, "step {step}: image differs from the model");
            }
        }
        img.flush().unwrap();
        let mut back = vec![0u8; SIZE as usize];
        img.read_at(&mut back, 0).unwrap();
        assert!(back == model, "final read differs from the model");
    }
    assert_qemu_clean(&path);
    let dump = dir.join("model.raw");
    std::fs::write(&dump, &model).unwrap();
    if qemu_ok(&["--version"]) {
        assert!(
            qemu_ok(&[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                path.to_str().unwrap(),
                dump.to_str().unwrap()
            ]),
            "qemu-img compare failed"
        );
    }
}

fn variants() -> Vec<(&'static str, CreateOptions)> {
    let d = CreateOptions::default();
    vec![
        ("default", d.clone()),
        (
            "v2",
            CreateOptions {
                version: 2,
                ..d.clone()
            },
        ),
        (
            "4k-refcount1",
            CreateOptions {
                cluster_size: 4096,
                refcount_bits: 1,
                ..d.clone()
            },
        ),
        (
            "512-refcount64",
            CreateOptions {
                cluster_size: 512,
                refcount_bits: 64,
                ..d.clone()
            },
        ),
        (
            "extl2-zstd",
            CreateOptions {
                cluster_size: 32768,
                extended_l2: true,
                compression: Compression::Zstd,
                ..d.clone()
            },
        ),
        (
            "refcount8-lazy",
            CreateOptions {
                refcount_bits: 8,
                lazy_refcounts: true,
                ..d
            },
        ),
    ]
}

#[test]
fn model_without_backing() {
    for (i, (name, opts)) in variants().into_iter().enumerate() {
        eprintln!("variant {name}");
        let dir = tempfile::tempdir().unwrap();
        run_model(dir.path(), opts, false, 0x1234_5678 + i as u64);
    }
}

#[test]
fn model_with_backing() {
    for (i, (name, opts)) in variants().into_iter().enumerate() {
        eprintln!("variant {name}");
        let dir = tempfile::tempdir().unwrap();
        run_model(dir.path(), opts, true, 0x9876_5432 + i as u64);
    }
}

/// Several threads writing disjoint ranges at once, then reading back.
#[test]
fn threads_share_one_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mt.qcow2");
    create(
        &path,
        &CreateOptions {
            size: SIZE,
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    let img = diskimg::open(&path, false, None).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let img = &img;
            s.spawn(move || {
                let mut rng = Rng(t + 1);
                for _ in 0..200 {
                    let block = rng.below(SIZE / 4 / 1000);
                    let off = t * (SIZE / 4) + block * 1000;
                    img.write_at(&[t as u8 + 1; 1000], off).unwrap();
                }
            });
        }
    });
    let mut back = vec![0u8; SIZE as usize];
    img.read_at(&mut back, 0).unwrap();
    for (i, &b) in back.iter().enumerate() {
        assert!(
            b == 0 || u64::from(b) == i as u64 / (SIZE / 4) + 1,
            "byte {i} = {b}"
        );
    }
    drop(img);
    assert_qemu_clean(&path);
}
