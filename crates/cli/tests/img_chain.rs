//! Backing chains across verbs: `commit -b` into a base further down the
//! chain, and `convert -B` (a target that keeps a backing file), checked
//! with the real qemu-img.

mod img_util;

use img_util::*;

/// base.qcow2 <- mid.qcow2 <- top.qcow2, each layer writing its own
/// pattern (top also zeroes a range that mid wrote).
fn three_layers(d: &std::path::Path) -> [std::path::PathBuf; 3] {
    let [base, mid, top] = ["base.qcow2", "mid.qcow2", "top.qcow2"].map(|n| d.join(n));
    ok(
        run("qemu-img", &["create", "-f", "qcow2", s(&base), "8M"]),
        "create base",
    );
    qemu_io(&base, "qcow2", &["write -P 1 0 8M"]);
    for (img, back) in [(&mid, "base.qcow2"), (&top, "mid.qcow2")] {
        ok(
            run(
                "qemu-img",
                &["create", "-f", "qcow2", "-b", back, "-F", "qcow2", s(img)],
            ),
            "create overlay",
        );
    }
    qemu_io(&mid, "qcow2", &["write -P 2 1M 2M", "write -P 3 6M 100k"]);
    qemu_io(&top, "qcow2", &["write -P 4 2M 512k", "write -z 6M 64k"]);
    [base, mid, top]
}

#[test]
fn commit_into_a_base_two_levels_down() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let [base, mid, top] = three_layers(d);
    let expect = d.join("expect.raw");
    ok(
        run("qemu-img", &["convert", "-O", "raw", s(&top), s(&expect)]),
        "expected contents",
    );
    let top_before = std::fs::read(&top).unwrap();
    ok(ox(&["commit", "-b", s(&base), s(&top)]), "commit -b base");
    ok(run("qemu-img", &["check", s(&base)]), "check base");
    ok(
        run("qemu-img", &["compare", "-F", "raw", s(&base), s(&expect)]),
        "base now reads as top did",
    );
    // -b implies -d: the top keeps its data (as qemu-img does).
    assert!(std::fs::read(&top).unwrap() == top_before, "top changed");
    ok(run("qemu-img", &["check", s(&mid)]), "check mid");
}

#[test]
fn commit_b_names_a_file_outside_the_chain() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let [_, _, top] = three_layers(d);
    let other = d.join("other.qcow2");
    ok(
        run("qemu-img", &["create", "-f", "qcow2", s(&other), "8M"]),
        "create other",
    );
    let out = ox(&["commit", "-b", s(&other), s(&top)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("other.qcow2") && err.contains("backing chain"),
        "{err}"
    );
}

#[test]
fn convert_with_a_backing_file_copies_only_the_top() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let [_, mid, top] = three_layers(d);
    let out = d.join("out.qcow2");
    ok(
        ox(&[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
            s(&out),
        ]),
        "convert -B",
    );
    ok(run("qemu-img", &["check", s(&out)]), "check out");
    ok(
        run("qemu-img", &["compare", s(&out), s(&top)]),
        "out reads as top",
    );
    let info: serde_json::Value = serde_json::from_slice(
        &ok(run("qemu-img", &["info", "--output=json", s(&out)]), "info").stdout,
    )
    .unwrap();
    assert_eq!(info["backing-filename"], "mid.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    // Only top's own clusters are in out: the same map as top's.
    let map = |img: &std::path::Path| -> Vec<(u64, u64, bool, bool)> {
        let v: serde_json::Value = serde_json::from_slice(
            &ok(run("qemu-img", &["map", "--output=json", s(img)]), "map").stdout,
        )
        .unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["depth"] == 0)
            .map(|e| {
                let f = |k: &str| e[k].as_u64().unwrap();
                let b = |k: &str| e[k].as_bool().unwrap();
                (f("start"), f("length"), b("data"), b("zero"))
            })
            .collect()
    };
    assert_eq!(map(&out), map(&top));
    let _ = mid;
}

#[test]
fn convert_b_refuses_several_sources_and_raw_targets() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let [base, mid, top] = three_layers(d);
    let out = d.join("out.img");
    let many = ox(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        s(&base),
        s(&mid),
        s(&top),
        s(&out),
    ]);
    assert_eq!(many.status.code(), Some(1));
    let raw = ox(&["convert", "-O", "raw", "-B", s(&base), s(&top), s(&out)]);
    assert_eq!(raw.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&raw.stderr).contains("Backing file not supported"));
    assert!(!out.exists(), "a refused convert left its output behind");
}
