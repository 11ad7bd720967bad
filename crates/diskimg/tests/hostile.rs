//! Hostile images: every bad header field, metadata pointing outside the
//! file, backing loops and missing backing files give an error naming the
//! file and the field, never a panic, and never a byte written.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use diskimg::qcow2::create::{create, CreateOptions};

fn valid_image(dir: &Path) -> PathBuf {
    let path = dir.join("victim.qcow2");
    create(
        &path,
        &CreateOptions {
            size: 4 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let img = diskimg::open(&path, false, None).unwrap();
    img.write_at(&[7u8; 100_000], 0).unwrap();
    drop(img);
    path
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// Opening (read-only and read-write) fails with `needle` in the message,
/// and the file is untouched.
fn assert_rejected(path: &Path, needle: &str) {
    let before = std::fs::read(path).unwrap();
    for read_only in [true, false] {
        let err = match diskimg::open(path, read_only, None) {
            Ok(_) => panic!("{}: opened despite {needle}", path.display()),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(needle),
            "error {err:?} does not name {needle:?}"
        );
        assert!(
            err.contains(path.file_name().unwrap().to_str().unwrap()),
            "error {err:?} does not name the file"
        );
    }
    assert!(
        std::fs::read(path).unwrap() == before,
        "{}: file changed",
        path.display()
    );
}

#[test]
fn bad_header_fields_are_named() {
    let cases: &[(&str, u64, &[u8])] = &[
        ("version", 4, &[0, 0, 0, 9]),
        ("cluster_bits", 20, &[0, 0, 0, 30]),
        ("cluster_bits", 20, &[0, 0, 0, 8]),
        ("l1_size", 36, &[0, 0, 0, 0]),
        ("l1_size", 36, &[0xff, 0xff, 0xff, 0xff]),
        ("l1_table_offset", 40, &[0, 0, 0, 0x10, 0, 0, 0, 0]),
        ("l1_table_offset", 40, &[0, 0, 0, 0, 0, 0, 0x12, 0x34]),
        ("refcount_table_offset", 48, &[0, 0, 0, 0, 0, 0, 0x02, 0]),
        ("refcount_table_offset", 48, &[0, 0, 0x10, 0, 0, 0, 0, 0]),
        ("refcount_table_clusters", 56, &[0, 0, 0, 0]),
        ("refcount_table_clusters", 56, &[0, 0x10, 0, 0]),
        ("incompatible_features", 72, &[0, 0, 0, 0, 0, 0x10, 0, 0]),
        ("refcount_order", 96, &[0, 0, 0, 7]),
        ("header_length", 100, &[0, 0, 0, 50]),
        ("compression_type", 104, &[5]),
        ("size", 24, &[0x40, 0, 0, 0, 0, 0, 0, 0]),
        ("nb_snapshots", 60, &[0, 0x10, 0, 0]),
        (
            "backing_file_size",
            8,
            &[0, 0, 0, 0, 0, 0, 0x01, 0, 0, 0, 0x20, 0],
        ),
        (
            "backing_file_offset",
            8,
            &[0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 8],
        ),
        ("magic", 0, b"QFI\x00"),
    ];
    for (field, offset, bytes) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = valid_image(dir.path());
        patch(&path, *offset, bytes);
        if *field == "magic" {
            // No longer qcow2 at all: it probes as raw, and qcow2 is refused.
            let err = diskimg::open(&path, true, Some(diskimg::Format::Qcow2))
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("magic"), "{err}");
            continue;
        }
        assert_rejected(&path, field);
    }
}

#[test]
fn unknown_incompatible_feature_is_named_from_the_feature_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = valid_image(dir.path());
    // Bit 1 is "corrupt": read-write refused, read-only allowed.
    patch(&path, 72, &[0, 0, 0, 0, 0, 0, 0, 2]);
    assert!(diskimg::open(&path, true, None).is_ok());
    let err = diskimg::open(&path, false, None).err().unwrap().to_string();
    assert!(err.contains("corrupt"), "{err}");
    patch(&path, 72, &[0x80, 0, 0, 0, 0, 0, 0, 0]);
    assert_rejected(&path, "bit 63");
}

#[test]
fn truncated_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = valid_image(dir.path());
    let full = std::fs::read(&path).unwrap();
    for len in [0usize, 10, 71, 103, 0x10000, 0x20000, 0x30004] {
        std::fs::write(&path, &full[..len]).unwrap();
        let err = diskimg::open(&path, true, Some(diskimg::Format::Qcow2))
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_else(|| panic!("opened a file truncated to {len} bytes"));
        assert!(err.contains("victim.qcow2"), "{err}");
    }
}

#[test]
fn metadata_pointing_outside_the_file_fails_on_use() {
    let dir = tempfile::tempdir().unwrap();
    let path = valid_image(dir.path());
    // L1 entry 0 (L1 at 0x30000) points past the end of the file.
    patch(
        &path,
        0x30000,
        &(0x8000_0000_0000_0000u64 | 0x40_0000_0000).to_be_bytes(),
    );
    let before = std::fs::read(&path).unwrap();
    let img = diskimg::open(&path, false, None).unwrap();
    let mut buf = [0u8; 512];
    let err = img.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(
        err.contains("L2 table") && err.contains("beyond the end"),
        "{err}"
    );
    assert!(img.write_at(&buf, 0).is_err());
    drop(img);
    assert!(std::fs::read(&path).unwrap() == before, "file changed");

    // An unaligned L2 entry.
    let path = valid_image(dir.path());
    patch(
        &path,
        0x40000,
        &(0x8000_0000_0000_0000u64 | 0x50_8000).to_be_bytes(),
    );
    let img = diskimg::open(&path, true, None).unwrap();
    let err = img.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(err.contains("not cluster aligned"), "{err}");

    // A refcount block past the end: allocation fails cleanly.
    let path = valid_image(dir.path());
    patch(&path, 0x10000, &0x40_0000_0000u64.to_be_bytes());
    let img = diskimg::open(&path, false, None).unwrap();
    let err = img.write_at(&[1u8; 512], 3 << 20).unwrap_err().to_string();
    assert!(err.contains("refcount block"), "{err}");
}

#[test]
fn backing_loops_and_missing_backing_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let opts = |b: &str| CreateOptions {
        size: 1 << 20,
        backing_file: Some(b.into()),
        backing_format: Some("qcow2".into()),
        ..Default::default()
    };
    create(&d.join("a.qcow2"), &opts("b.qcow2")).unwrap();
    create(&d.join("b.qcow2"), &opts("a.qcow2")).unwrap();
    assert_rejected(&d.join("a.qcow2"), "loops");
    create(&d.join("self.qcow2"), &opts("self.qcow2")).unwrap();
    assert_rejected(&d.join("self.qcow2"), "loops");
    create(&d.join("orphan.qcow2"), &opts("gone.qcow2")).unwrap();
    assert_rejected(&d.join("orphan.qcow2"), "gone.qcow2");
    // A deep chain is fine.
    create(
        &d.join("l0.qcow2"),
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    for i in 1..40 {
        create(
            &d.join(format!("l{i}.qcow2")),
            &opts(&format!("l{}.qcow2", i - 1)),
        )
        .unwrap();
    }
    let top = diskimg::open(&d.join("l39.qcow2"), true, None).unwrap();
    let mut buf = [1u8; 4096];
    top.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}
