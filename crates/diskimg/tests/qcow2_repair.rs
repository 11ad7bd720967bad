//! A qcow2 image with lazy refcounts left dirty by a writer that died
//! (qemu-io `abort`) is repaired when oxvirt opens it for writing, and
//! left as it is when opened read-only.

mod common;

use std::path::Path;
use std::process::Command;

use common::{assert_qemu_clean, qemu_img, qemu_ok};

fn dirty_flag(path: &Path) -> bool {
    let out = qemu_img(&["info", "--output=json", "-U", path.to_str().unwrap()]).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["dirty-flag"]
        .as_bool()
        .expect("dirty-flag in qemu-img info")
}

/// Makes a dirty image: qemu-io writes with lazy refcounts, then aborts.
fn make_dirty(path: &Path) -> bool {
    if !qemu_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        path.to_str().unwrap(),
        "16M",
    ]) {
        return false;
    }
    let status = Command::new("qemu-io")
        .args([
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0x33 4M 64k",
            "-c",
            "abort",
        ])
        .arg(path)
        .output();
    match status {
        Ok(out) => assert!(!out.status.success(), "qemu-io abort should kill it"),
        Err(_) => {
            eprintln!("SKIP: qemu-io is not installed (scripts/setup.sh installs qemu-utils)");
            return false;
        }
    }
    assert!(dirty_flag(path), "qemu-io abort left the image clean");
    let check = qemu_img(&["check", path.to_str().unwrap()]).unwrap();
    assert_eq!(
        check.status.code(),
        Some(2),
        "the dirty image has stale refcounts"
    );
    true
}

#[test]
fn dirty_lazy_refcount_image_is_repaired_on_open_for_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty.qcow2");
    if !make_dirty(&path) {
        return;
    }
    {
        let img = diskimg::open(&path, false, None).unwrap();
        img.write_at(&[0x77; 65536], 8 << 20).unwrap();
        img.flush().unwrap();
    }
    assert!(!dirty_flag(&path), "the dirty flag is still set");
    assert_qemu_clean(&path);
    let mut model = vec![0u8; 16 << 20];
    model[..1 << 20].fill(0x5a);
    model[4 << 20..(4 << 20) + 65536].fill(0x33);
    model[8 << 20..(8 << 20) + 65536].fill(0x77);
    let raw = dir.path().join("model.raw");
    std::fs::write(&raw, &model).unwrap();
    assert!(qemu_ok(&[
        "compare",
        "-F",
        "raw",
        path.to_str().unwrap(),
        raw.to_str().unwrap()
    ]));
}

#[test]
fn dirty_image_opened_read_only_is_read_but_not_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dirty.qcow2");
    if !make_dirty(&path) {
        return;
    }
    let before = std::fs::read(&path).unwrap();
    {
        let img = diskimg::open(&path, true, None).unwrap();
        let mut buf = vec![0u8; 65536];
        img.read_at(&mut buf, 4 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0x33));
    }
    assert!(
        std::fs::read(&path).unwrap() == before,
        "a read-only open changed the file"
    );
}
