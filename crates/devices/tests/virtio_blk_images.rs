//! virtio-blk over images opened by diskimg's real opener, checked with
//! qemu-img: a qcow2 over a raw backing file, and a raw image.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use devices::virtio::block::{Block, BlockConfig};
use vm_memory::{Bytes, GuestAddress};

const SIZE: u64 = 16 << 20;
const HDR: u64 = DATA_BASE;
const STATUS: u64 = DATA_BASE + 0x100;
const DATA: u64 = DATA_BASE + 0x1000;

fn qemu_img(args: &[&str]) -> Vec<u8> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    testkit::require(ok, "qemu-img is not installed")
}

fn request(d: &mut Driver<Block>, kind: u32, sector: u64, data: Buf) -> u8 {
    d.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
    d.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    d.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    let mut bufs = vec![rd(HDR, 16)];
    if data.len > 0 {
        bufs.push(data);
    }
    bufs.push(wr(STATUS, 1));
    d.submit(0, &bufs);
    d.mem.read_obj(GuestAddress(STATUS)).unwrap()
}

/// The probe guest's pattern: every 8-byte word of sector N holds N ^ seed.
fn sector_pattern(first: u64, sectors: u64, seed: u64) -> Vec<u8> {
    (first..first + sectors)
        .flat_map(|n| std::iter::repeat_n(n ^ seed, 64))
        .flat_map(u64::to_le_bytes)
        .collect()
}

fn open(path: &Path) -> Driver<Block> {
    let disk = diskimg::open(path, false, None).expect("open image");
    let mut d = Driver::new(Block::new(Arc::from(disk), BlockConfig::default()).unwrap());
    d.init(u64::MAX, 1, 128);
    d
}

#[test]
fn heavy_blk_qcow2_over_backing_file_round_trips_through_qemu_img() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    let base_data = sector_pattern(0, SIZE / 512, 0xba5e);
    std::fs::write(&base, &base_data).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        top.to_str().unwrap(),
    ]);

    let mut d = open(&top);
    // Reads of unallocated clusters come from the backing file.
    assert_eq!(request(&mut d, 0, 1000, wr(DATA, 8192)), 0);
    let mut got = vec![0u8; 8192];
    d.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, &base_data[1000 * 512..1000 * 512 + 8192]);
    // 1 MiB written straddling clusters, then flushed.
    let written = sector_pattern(2047, 2048, 0x5eed);
    d.mem.write_slice(&written, GuestAddress(DATA)).unwrap();
    assert_eq!(request(&mut d, 1, 2047, rd(DATA, written.len() as u32)), 0);
    assert_eq!(request(&mut d, 4, 0, wr(0, 0)), 0);
    drop(d);

    qemu_img(&["check", "-q", top.to_str().unwrap()]);
    let flat = dir.path().join("flat.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        top.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    let flat = std::fs::read(&flat).unwrap();
    let at = 2047 * 512;
    assert!(
        flat[at..at + written.len()] == written[..],
        "written range differs"
    );
    assert!(
        flat[..at] == base_data[..at],
        "data before the write changed"
    );
    assert!(
        flat[at + written.len()..] == base_data[at + written.len()..],
        "data after the write changed"
    );
    assert!(
        std::fs::read(&base).unwrap() == base_data,
        "backing file was written"
    );
}

#[test]
fn heavy_blk_raw_image_written_by_qemu_img_reads_back() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    let pattern = sector_pattern(0, SIZE / 512, 7);
    let src = dir.path().join("src.raw");
    std::fs::write(&src, &pattern).unwrap();
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let mut d = open(&img);
    assert_eq!(request(&mut d, 0, 4096, wr(DATA, 1 << 20)), 0);
    let mut got = vec![0u8; 1 << 20];
    d.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(
        got == pattern[4096 * 512..4096 * 512 + (1 << 20)],
        "read differs from what qemu-img wrote"
    );
}
