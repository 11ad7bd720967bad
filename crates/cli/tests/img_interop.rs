//! `oxvirt img` against the real qemu-img, both ways: images qemu-img
//! makes read back identical through oxvirt; images oxvirt makes pass
//! `qemu-img check` and `qemu-img compare`. Exit codes match qemu-img's.

mod img_util;

use std::path::{Path, PathBuf};

use img_util::*;

const QEMU_OPTIONS: &[&str] = &[
    "compat=0.10",
    "compat=1.1",
    "cluster_size=512",
    "cluster_size=4k",
    "cluster_size=2M",
    "refcount_bits=1",
    "refcount_bits=8",
    "refcount_bits=64",
    "lazy_refcounts=on",
    "extended_l2=on",
    "extended_l2=on,cluster_size=128k",
    "compression_type=zstd",
    "preallocation=metadata",
    "preallocation=falloc",
    "preallocation=full",
];

#[test]
fn heavy_qemu_made_images_read_identical() {
    if !have_qemu() {
        return;
    }
    for opts in QEMU_OPTIONS {
        let dir = tempdir();
        let img = dir.path().join("q.qcow2");
        ok(
            run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", opts, s(&img), "8M"],
            ),
            opts,
        );
        qemu_io(
            &img,
            "qcow2",
            &[
                "write -P 0xab 0 100k",
                "write -z 1M 64k",
                "write -P 5 3000k 300k",
                "discard 3M 64k",
                "write -P 9 8000k 192k",
            ],
        );
        assert_reads_same(dir.path(), &img);
        let info = ok(ox(&["info", "--output=json", s(&img)]), "info");
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v["virtual-size"], 8 << 20, "{opts}");
    }
}

#[test]
fn heavy_qemu_compressed_and_chains_read_identical() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let src = d.join("src.raw");
    make_source(&src, 6 << 20);
    for ctype in ["zlib", "zstd"] {
        let img = d.join(format!("c-{ctype}.qcow2"));
        ok(
            run(
                "qemu-img",
                &[
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    &format!("compression_type={ctype}"),
                    s(&src),
                    s(&img),
                ],
            ),
            "qemu convert -c",
        );
        assert_reads_same(d, &img);
        ok(ox(&["compare", s(&img), s(&src)]), "compare compressed");
    }
    // A three-deep chain with relative names, written at every level.
    let sub = d.join("sub");
    std::fs::create_dir(&sub).unwrap();
    ok(
        run(
            "qemu-img",
            &[
                "convert",
                "-O",
                "qcow2",
                s(&src),
                s(&sub.join("base.qcow2")),
            ],
        ),
        "base",
    );
    ok(
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                s(&sub.join("mid.qcow2")),
            ],
        ),
        "mid",
    );
    ok(
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                s(&sub.join("top.qcow2")),
            ],
        ),
        "top",
    );
    qemu_io(
        &sub.join("mid.qcow2"),
        "qcow2",
        &["write -P 1 1M 70k", "write -z 2M 128k"],
    );
    qemu_io(
        &sub.join("top.qcow2"),
        "qcow2",
        &["write -P 2 1040k 10k", "discard 4M 64k"],
    );
    assert_reads_same(d, &sub.join("top.qcow2"));
    // Internal snapshots: the active state still reads the same.
    let top = sub.join("top.qcow2");
    ok(
        run("qemu-img", &["snapshot", "-c", "s1", s(&top)]),
        "snapshot",
    );
    qemu_io(&top, "qcow2", &["write -P 3 0 64k"]);
    assert_reads_same(d, &top);
    let info = ok(ox(&["info", "--output=json", s(&top)]), "info");
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["snapshots"][0]["name"], "s1");
    assert_eq!(v["backing-filename"], "mid.qcow2");
}

const OX_OPTIONS: &[&str] = &[
    "compat=0.10",
    "compat=1.1",
    "cluster_size=512",
    "cluster_size=2M",
    "refcount_bits=1",
    "refcount_bits=2",
    "refcount_bits=32",
    "refcount_bits=64",
    "lazy_refcounts=on",
    "extended_l2=on",
    "compression_type=zstd",
];

#[test]
fn heavy_oxvirt_made_images_pass_qemu_check() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let src = d.join("src.raw");
    make_source(&src, 5 << 20);
    for opts in OX_OPTIONS {
        let img = d.join("o.qcow2");
        ok(
            ox(&["convert", "-O", "qcow2", "-o", opts, s(&src), s(&img)]),
            opts,
        );
        ok(
            run("qemu-img", &["check", s(&img)]),
            &format!("qemu-img check ({opts})"),
        );
        ok(
            run("qemu-img", &["compare", s(&img), s(&src)]),
            &format!("qemu-img compare ({opts})"),
        );
        for c in ["zlib", "zstd"] {
            let o = format!("{opts},compression_type={c}");
            if opts.contains("0.10") && c == "zstd" {
                continue;
            }
            let img = d.join("oc.qcow2");
            ok(
                ox(&["convert", "-c", "-O", "qcow2", "-o", &o, s(&src), s(&img)]),
                &o,
            );
            ok(
                run("qemu-img", &["check", s(&img)]),
                &format!("qemu-img check -c ({o})"),
            );
            ok(
                run("qemu-img", &["compare", s(&img), s(&src)]),
                &format!("qemu-img compare -c ({o})"),
            );
        }
    }
    for prealloc in ["off", "metadata", "falloc", "full"] {
        let img = d.join("p.qcow2");
        ok(
            ox(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("preallocation={prealloc}"),
                s(&img),
                "3M",
            ]),
            prealloc,
        );
        ok(
            run("qemu-img", &["check", s(&img)]),
            &format!("qemu-img check prealloc={prealloc}"),
        );
        let info = ok(run("qemu-img", &["info", "--output=json", s(&img)]), "info");
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v["virtual-size"], 3 << 20);
    }
}

/// oxvirt writes into a chain qemu-img made; qemu-img agrees.
#[test]
fn heavy_oxvirt_writes_over_backing_chain() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let src = d.join("src.raw");
    make_source(&src, 4 << 20);
    ok(
        run(
            "qemu-img",
            &["convert", "-O", "qcow2", s(&src), s(&d.join("base.qcow2"))],
        ),
        "base",
    );
    ok(
        ox(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&d.join("top.qcow2")),
        ]),
        "create -b",
    );
    let top = d.join("top.qcow2");
    // Convert -n writes the same source into the overlay (all COW paths).
    let other = d.join("other.raw");
    make_source(&other, 4 << 20);
    let mut bytes = std::fs::read(&other).unwrap();
    bytes.reverse();
    std::fs::write(&other, &bytes).unwrap();
    ok(
        ox(&["convert", "-n", "-O", "qcow2", s(&other), s(&top)]),
        "convert -n",
    );
    ok(
        run("qemu-img", &["check", s(&top)]),
        "qemu-img check overlay",
    );
    ok(
        run("qemu-img", &["compare", s(&top), s(&other)]),
        "qemu-img compare overlay",
    );
}

#[test]
fn info_json_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    ok(
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compression_type=zstd,extended_l2=on,lazy_refcounts=on,refcount_bits=8",
                s(&d.join("a.qcow2")),
                "64M",
            ],
        ),
        "a",
    );
    ok(
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "a.qcow2",
                "-F",
                "qcow2",
                s(&d.join("b.qcow2")),
            ],
        ),
        "b",
    );
    ok(
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                s(&d.join("v2.qcow2")),
                "1M",
            ],
        ),
        "v2",
    );
    ok(
        run(
            "qemu-img",
            &["snapshot", "-c", "snap", s(&d.join("v2.qcow2"))],
        ),
        "snapshot",
    );
    ok(
        run(
            "qemu-img",
            &["create", "-q", "-f", "raw", s(&d.join("r.raw")), "1M"],
        ),
        "raw",
    );
    for name in ["a.qcow2", "b.qcow2", "v2.qcow2", "r.raw"] {
        let path = d.join(name);
        let theirs: serde_json::Value = serde_json::from_slice(
            &ok(
                run("qemu-img", &["info", "--output=json", s(&path)]),
                "qemu info",
            )
            .stdout,
        )
        .unwrap();
        let mut ours: serde_json::Value = serde_json::from_slice(
            &ok(ox(&["info", "--output=json", s(&path)]), "oxvirt info").stdout,
        )
        .unwrap();
        align_to(&mut ours, &theirs);
        assert_eq!(ours, theirs, "{name}");
    }
    let chain = ok(
        ox(&[
            "info",
            "--backing-chain",
            "--output=json",
            s(&d.join("b.qcow2")),
        ]),
        "chain",
    );
    let v: serde_json::Value = serde_json::from_slice(&chain.stdout).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2));
}

fn fresh_with_data(d: &Path) -> PathBuf {
    let src = d.join("src.raw");
    make_source(&src, 2 << 20);
    let img = d.join("x.qcow2");
    ok(ox(&["convert", "-O", "qcow2", s(&src), s(&img)]), "convert");
    img
}

#[test]
fn check_exit_codes_and_repair() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let img = fresh_with_data(d);
    assert_eq!(ox(&["check", s(&img)]).status.code(), Some(0));
    // A leak: refcount 1 on a cluster nothing uses (a new cluster at the
    // end of the file; 16-bit entries in the refcount block at 0x20000).
    let len = std::fs::metadata(&img).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(len + 65536)
        .unwrap();
    patch(&img, 0x20000 + len / 65536 * 2, &[0, 1]);
    assert_eq!(ox(&["check", s(&img)]).status.code(), Some(3));
    assert_eq!(run("qemu-img", &["check", s(&img)]).status.code(), Some(3));
    let json = ox(&["check", "--output=json", s(&img)]);
    let mut v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["leaks"], 1);
    let theirs = run("qemu-img", &["check", "--output=json", s(&img)]);
    let theirs: serde_json::Value = serde_json::from_slice(&theirs.stdout).unwrap();
    align_to(&mut v, &theirs);
    assert_eq!(v, theirs);
    assert_eq!(
        ox(&["check", "-r", "leaks", s(&img)]).status.code(),
        Some(0)
    );
    assert_eq!(run("qemu-img", &["check", s(&img)]).status.code(), Some(0));
    // A corruption: refcount 0 on the first data cluster (cluster 5, after
    // header, refcount table, refcount block, L1 and L2 tables).
    patch(&img, 0x20000 + 5 * 2, &[0, 0]);
    assert_eq!(ox(&["check", s(&img)]).status.code(), Some(2));
    assert_eq!(run("qemu-img", &["check", s(&img)]).status.code(), Some(2));
    assert_eq!(
        ox(&["check", "-r", "leaks", s(&img)]).status.code(),
        Some(2)
    );
    assert_eq!(ox(&["check", "-r", "all", s(&img)]).status.code(), Some(0));
    assert_eq!(run("qemu-img", &["check", s(&img)]).status.code(), Some(0));
    ok(
        ox(&["compare", s(&img), s(&d.join("src.raw"))]),
        "data intact after repair",
    );
    // Raw: checks not supported; a missing file: 1.
    assert_eq!(
        ox(&["check", s(&d.join("src.raw"))]).status.code(),
        Some(63)
    );
    assert_eq!(
        ox(&["check", "-f", "qcow2", s(&d.join("missing"))])
            .status
            .code(),
        Some(1)
    );
}

#[test]
fn compare_exit_codes() {
    let dir = tempdir();
    let d = dir.path();
    let img = fresh_with_data(d);
    let src = d.join("src.raw");
    assert_eq!(ox(&["compare", s(&img), s(&src)]).status.code(), Some(0));
    let mut bytes = std::fs::read(&src).unwrap();
    bytes[1_000_000] ^= 0xff;
    std::fs::write(d.join("changed.raw"), &bytes).unwrap();
    let out = ox(&["compare", s(&img), s(&d.join("changed.raw"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Content mismatch at offset 999936!"));
    assert_eq!(
        ox(&["compare", s(&img), s(&d.join("missing"))])
            .status
            .code(),
        Some(2)
    );
    // Strict mode: a longer image with a zero tail is equal only without -s.
    bytes[1_000_000] ^= 0xff;
    bytes.extend_from_slice(&[0u8; 65536]);
    std::fs::write(d.join("longer.raw"), &bytes).unwrap();
    assert_eq!(
        ox(&["compare", s(&img), s(&d.join("longer.raw"))])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        ox(&["compare", "-s", s(&img), s(&d.join("longer.raw"))])
            .status
            .code(),
        Some(1)
    );
}

#[test]
fn map_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.qcow2");
    ok(
        run("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "4M"]),
        "base",
    );
    qemu_io(&base, "qcow2", &["write -P 1 0 128k", "write -z 1M 64k"]);
    let top = d.join("top.qcow2");
    ok(
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                s(&top),
            ],
        ),
        "top",
    );
    qemu_io(&top, "qcow2", &["write -P 2 64k 128k"]);
    let theirs = ok(
        run("qemu-img", &["map", "--output=json", s(&top)]),
        "qemu map",
    );
    let ours = ok(ox(&["map", "--output=json", s(&top)]), "oxvirt map");
    let a: serde_json::Value = serde_json::from_slice(&theirs.stdout).unwrap();
    let mut b: serde_json::Value = serde_json::from_slice(&ours.stdout).unwrap();
    align_to(&mut b, &a);
    assert_eq!(b, a);
}

#[test]
fn failed_convert_removes_output_and_keeps_source() {
    let dir = tempdir();
    let d = dir.path();
    let img = fresh_with_data(d);
    // Point L1 entry 0 (L1 table at 0x30000) at an L2 table past the end of the file.
    patch(
        &img,
        0x30000,
        &(0x8000_0000_0000_0000u64 | 0x7f_0000_0000).to_be_bytes(),
    );
    let before = std::fs::read(&img).unwrap();
    for fmt in ["raw", "qcow2"] {
        let out_path = d.join(format!("out.{fmt}"));
        let out = ox(&["convert", "-O", fmt, s(&img), s(&out_path)]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("x.qcow2") && err.contains("L2 table"), "{err}");
        assert!(!out_path.exists(), "partial output left behind");
    }
    assert_eq!(std::fs::read(&img).unwrap(), before, "source modified");
}

#[test]
fn resize_grow_and_shrink() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let img = fresh_with_data(d);
    ok(ox(&["resize", s(&img), "+1G"]), "grow");
    ok(run("qemu-img", &["check", s(&img)]), "check after grow");
    let info: serde_json::Value = serde_json::from_slice(
        &ok(run("qemu-img", &["info", "--output=json", s(&img)]), "info").stdout,
    )
    .unwrap();
    assert_eq!(info["virtual-size"], (2u64 << 20) + (1 << 30));
    assert_eq!(ox(&["resize", s(&img), "1M"]).status.code(), Some(1));
    ok(ox(&["resize", "--shrink", s(&img), "1M"]), "shrink");
    ok(run("qemu-img", &["check", s(&img)]), "check after shrink");
    let head = d.join("head.raw");
    let src = std::fs::read(d.join("src.raw")).unwrap();
    std::fs::write(&head, &src[..1 << 20]).unwrap();
    ok(
        run("qemu-img", &["compare", s(&img), s(&head)]),
        "compare after shrink",
    );
}

/// A raw file that is not whole sectors: QEMU rounds sizes up to 512 bytes.
#[test]
fn odd_sized_raw_converts_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let src = d.join("odd.raw");
    std::fs::write(&src, vec![0x61u8; 100_001]).unwrap();
    for extra in [vec![], vec!["-c"]] {
        let img = d.join("odd.qcow2");
        let mut args = vec!["convert"];
        args.extend(extra.iter().copied());
        args.extend(["-O", "qcow2", s(&src), s(&img)]);
        ok(ox(&args), "convert");
        ok(run("qemu-img", &["check", s(&img)]), "check");
        ok(
            run("qemu-img", &["compare", s(&img), s(&src)]),
            "qemu-img compare",
        );
        let v: serde_json::Value = serde_json::from_slice(
            &ok(run("qemu-img", &["info", "--output=json", s(&img)]), "info").stdout,
        )
        .unwrap();
        assert_eq!(v["virtual-size"], 100_352);
    }
}

/// The copy's options (`-W`, `-m`, `-S`, `-n`) against qemu-img's on a
/// qcow2 of several 2 MiB chunks holding data, zeroes written as data, a
/// zero cluster and unallocated ranges: the same bytes, the same holes.
#[test]
fn convert_options_match_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let src = d.join("src.qcow2");
    ok(
        run("qemu-img", &["create", "-q", "-f", "qcow2", s(&src), "12M"]),
        "create",
    );
    qemu_io(
        &src,
        "qcow2",
        &[
            "write -P 0x11 0 5M",
            "write -P 0 1M 256k",
            "write -P 0x22 7M 2112k",
            "write -z 8M 64k",
            "write -P 0x33 11M 4k",
        ],
    );
    let raw_map = |p: &Path| {
        let out = run("qemu-img", &["map", "--output=json", "-f", "raw", s(p)]);
        String::from_utf8(ok(out, "map").stdout).unwrap()
    };
    let allocated = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    for opts in [&[][..], &["-W"], &["-m", "1"], &["-m", "16"], &["-S", "0"]] {
        let (ours, theirs) = (d.join("ours.raw"), d.join("theirs.raw"));
        let args = |out: &Path| {
            let mut a = vec!["convert"];
            a.extend_from_slice(opts);
            a.extend(["-O", "raw", s(&src)]);
            a.push(s(out).to_string().leak());
            a
        };
        ok(ox(&args(&ours)), "oxvirt convert");
        ok(run("qemu-img", &args(&theirs)), "qemu-img convert");
        let what = format!("convert {opts:?}");
        assert!(
            std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
            "{what}: contents differ"
        );
        if opts == ["-S", "0"] {
            // qemu-img allocates zeroes with fallocate, which SEEK_DATA
            // reports as holes: compare the allocation instead.
            assert_eq!(allocated(&ours), 12 << 20, "{what}: not fully allocated");
            assert_eq!(allocated(&theirs), 12 << 20);
        } else {
            assert_eq!(raw_map(&ours), raw_map(&theirs), "{what}: holes differ");
        }
        std::fs::remove_file(&ours).unwrap();
        std::fs::remove_file(&theirs).unwrap();
    }
    // -n: an existing target full of 0xff ends up equal to the source.
    let target = d.join("target.raw");
    std::fs::write(&target, vec![0xffu8; 12 << 20]).unwrap();
    ok(
        ox(&["convert", "-n", "-O", "raw", s(&src), s(&target)]),
        "convert -n",
    );
    ok(
        run("qemu-img", &["compare", "-q", s(&src), s(&target)]),
        "compare after -n",
    );
}
