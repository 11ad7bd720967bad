//! Extended L2: a write into part of a cluster allocates only the
//! subclusters it touches; the rest still read from the backing file.
//! qemu-img's map, check and compare agree.

mod common;

use common::{assert_qemu_clean, qemu_img, qemu_ok};

/// The byte ranges qemu-img map says the top image itself holds, merged.
fn top_ranges(path: &std::path::Path) -> Vec<(u64, u64)> {
    let out = qemu_img(&["map", "--output=json", path.to_str().unwrap()]).unwrap();
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in map.as_array().unwrap().iter().filter(|e| e["depth"] == 0) {
        let start = e["start"].as_u64().unwrap();
        let end = start + e["length"].as_u64().unwrap();
        match ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => ranges.push((start, end)),
        }
    }
    ranges
}

#[test]
fn partial_writes_allocate_only_their_subclusters() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    let size = 1 << 20;
    let mut model: Vec<u8> = (0..size).map(|i| (i / 512) as u8 | 1).collect();
    std::fs::write(&base, &model).unwrap();
    if !qemu_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=64k",
        "-b",
        "base.raw",
        "-F",
        "raw",
        top.to_str().unwrap(),
    ]) {
        return;
    }
    let writes: [(u64, usize); 4] = [(10240, 4096), (70000, 100), (130000, 10000), (200000, 3)];
    {
        let img = diskimg::open(&top, false, None).unwrap();
        for (i, &(at, len)) in writes.iter().enumerate() {
            let data = vec![0xa0 + i as u8; len];
            img.write_at(&data, at).unwrap();
            model[at as usize..at as usize + len].copy_from_slice(&data);
        }
        // A second write into an allocated cluster's unallocated subcluster.
        img.write_at(&[0xee; 2048], 12288 + 4096).unwrap();
        model[16384..18432].fill(0xee);
        let mut back = vec![0u8; size];
        img.read_at(&mut back, 0).unwrap();
        assert!(back == model, "read back differs from the model");
    }
    assert_qemu_clean(&top);
    let expect = dir.path().join("expect.raw");
    std::fs::write(&expect, &model).unwrap();
    assert!(qemu_ok(&[
        "compare",
        "-F",
        "raw",
        top.to_str().unwrap(),
        expect.to_str().unwrap()
    ]));
    // 2 KiB subclusters: each write rounds out to the subclusters it touches.
    assert_eq!(
        top_ranges(&top),
        vec![
            (10240, 14336),
            (16384, 18432),
            (69632, 71680),
            (129024, 141312),
            (198656, 200704)
        ]
    );
}
