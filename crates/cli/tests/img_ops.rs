//! `oxvirt img snapshot`, `commit`, `rebase`, `measure` and VMDK sources,
//! checked against the real qemu-img.

mod img_util;

use img_util::*;

#[test]
fn snapshots_round_trip_with_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let src = d.join("src.raw");
    make_source(&src, 3 << 20);
    let img = d.join("s.qcow2");
    ok(ox(&["convert", "-O", "qcow2", s(&src), s(&img)]), "convert");
    ok(ox(&["snapshot", "-c", "one", s(&img)]), "snapshot -c");
    ok(run("qemu-img", &["check", s(&img)]), "check after -c");
    qemu_io(&img, "qcow2", &["write -P 9 0 1M", "write -z 2M 64k"]);
    ok(ox(&["snapshot", "-c", "two", s(&img)]), "snapshot -c two");
    let list = ok(ox(&["snapshot", "-l", s(&img)]), "snapshot -l");
    let theirs = ok(
        run("qemu-img", &["snapshot", "-l", s(&img)]),
        "qemu snapshot -l",
    );
    assert_eq!(
        String::from_utf8_lossy(&list.stdout),
        String::from_utf8_lossy(&theirs.stdout)
    );
    // Reverting to "one" brings back the source; qemu-img agrees.
    ok(ox(&["snapshot", "-a", "one", s(&img)]), "snapshot -a");
    ok(run("qemu-img", &["check", s(&img)]), "check after -a");
    ok(
        run("qemu-img", &["compare", s(&img), s(&src)]),
        "compare after -a",
    );
    // Writes after the revert do not touch the snapshots' clusters.
    qemu_io(&img, "qcow2", &["write -P 7 512k 100k"]);
    ok(ox(&["snapshot", "-d", "one", s(&img)]), "snapshot -d one");
    ok(ox(&["snapshot", "-a", "two", s(&img)]), "snapshot -a two");
    ok(ox(&["snapshot", "-d", "two", s(&img)]), "snapshot -d two");
    ok(run("qemu-img", &["check", s(&img)]), "check after -d");
    let v: serde_json::Value = serde_json::from_slice(
        &ok(run("qemu-img", &["info", "--output=json", s(&img)]), "info").stdout,
    )
    .unwrap();
    assert!(v.get("snapshots").is_none(), "snapshots left: {v}");
    // qemu-img made snapshots apply through oxvirt too.
    ok(
        run("qemu-img", &["snapshot", "-c", "q", s(&img)]),
        "qemu snapshot",
    );
    let expect = d.join("expect.raw");
    ok(
        run("qemu-img", &["convert", "-O", "raw", s(&img), s(&expect)]),
        "expect",
    );
    qemu_io(&img, "qcow2", &["write -P 1 0 3M"]);
    ok(ox(&["snapshot", "-a", "q", s(&img)]), "apply qemu snapshot");
    ok(run("qemu-img", &["check", s(&img)]), "check");
    ok(
        run("qemu-img", &["compare", s(&img), s(&expect)]),
        "compare",
    );
    assert_eq!(
        ox(&["snapshot", "-a", "missing", s(&img)]).status.code(),
        Some(1)
    );
}

#[test]
fn commit_and_rebase_match_qemu_semantics() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let src = d.join("src.raw");
    make_source(&src, 4 << 20);
    let base = d.join("base.qcow2");
    let top = d.join("top.qcow2");
    ok(ox(&["convert", "-O", "qcow2", s(&src), s(&base)]), "base");
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
            s(&top),
        ]),
        "top",
    );
    qemu_io(&top, "qcow2", &["write -P 3 100k 1M", "write -z 3M 64k"]);
    let expect = d.join("expect.raw");
    ok(
        run("qemu-img", &["convert", "-O", "raw", s(&top), s(&expect)]),
        "expect",
    );
    // Safe rebase onto a different image keeps the guest view.
    let other = d.join("other.qcow2");
    ok(ox(&["convert", "-O", "qcow2", s(&src), s(&other)]), "other");
    qemu_io(&other, "qcow2", &["write -P 4 0 2M"]);
    ok(
        ox(&["rebase", "-b", "other.qcow2", "-F", "qcow2", s(&top)]),
        "rebase",
    );
    ok(run("qemu-img", &["check", s(&top)]), "check after rebase");
    ok(
        run("qemu-img", &["compare", s(&top), s(&expect)]),
        "compare after rebase",
    );
    let v: serde_json::Value = serde_json::from_slice(
        &ok(run("qemu-img", &["info", "--output=json", s(&top)]), "info").stdout,
    )
    .unwrap();
    assert_eq!(v["backing-filename"], "other.qcow2");
    // Unsafe rebase only renames: back to base, still equal (the safe
    // rebase copied what differs between base and other).
    ok(
        ox(&["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", s(&top)]),
        "rebase -u",
    );
    ok(
        run("qemu-img", &["compare", s(&top), s(&expect)]),
        "compare after rebase -u",
    );
    // Commit moves the overlay's data into base and empties the overlay.
    ok(ox(&["commit", s(&top)]), "commit");
    ok(run("qemu-img", &["check", s(&base)]), "check base");
    ok(run("qemu-img", &["check", s(&top)]), "check top");
    ok(
        run("qemu-img", &["compare", s(&base), s(&expect)]),
        "base holds the data",
    );
    ok(
        run("qemu-img", &["compare", s(&top), s(&expect)]),
        "top still reads the same",
    );
    let map: serde_json::Value =
        serde_json::from_slice(&ok(ox(&["map", "--output=json", s(&top)]), "map").stdout).unwrap();
    assert!(
        map.as_array().unwrap().iter().all(|e| e["depth"] == 1),
        "overlay not empty: {map}"
    );
    // Removing the backing file with -u -b "".
    ok(ox(&["rebase", "-u", "-b", "", s(&top)]), "rebase -b ''");
    let v: serde_json::Value = serde_json::from_slice(
        &ok(run("qemu-img", &["info", "--output=json", s(&top)]), "info").stdout,
    )
    .unwrap();
    assert!(v.get("backing-filename").is_none());
}

#[test]
fn measure_matches_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let src = d.join("src.raw");
    make_source(&src, 3 << 20);
    let q = d.join("q.qcow2");
    ok(ox(&["convert", "-O", "qcow2", s(&src), s(&q)]), "convert");
    let cases: Vec<Vec<&str>> = vec![
        vec!["--size", "1G", "-O", "qcow2"],
        vec!["--size", "7G", "-O", "qcow2", "-o", "extended_l2=on"],
        vec![
            "--size",
            "100M",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,refcount_bits=1,preallocation=full",
        ],
        vec!["-O", "qcow2", s(&src)],
        vec!["-O", "qcow2", s(&q)],
        vec!["-O", "raw", s(&q)],
        vec![
            "--output=json",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
            s(&q),
        ],
    ];
    for c in cases {
        let mut args = vec!["measure"];
        args.extend_from_slice(&c);
        let theirs = ok(run("qemu-img", &args), "qemu measure");
        let ours = ok(ox(&args), "oxvirt measure");
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&theirs.stdout),
            "{c:?}"
        );
    }
}

#[test]
fn vmdk_sources_convert() {
    if !have_qemu() {
        return;
    }
    let dir = tempdir();
    let d = dir.path();
    let src = d.join("src.raw");
    make_source(&src, 5 << 20);
    for sub in ["monolithicSparse", "streamOptimized", "monolithicFlat"] {
        let vmdk = d.join(format!("{sub}.vmdk"));
        ok(
            run(
                "qemu-img",
                &[
                    "convert",
                    "-O",
                    "vmdk",
                    "-o",
                    &format!("subformat={sub}"),
                    s(&src),
                    s(&vmdk),
                ],
            ),
            sub,
        );
        assert_reads_same(d, &vmdk);
        let out = d.join(format!("{sub}.qcow2"));
        ok(
            ox(&["convert", "-O", "qcow2", s(&vmdk), s(&out)]),
            "vmdk to qcow2",
        );
        ok(run("qemu-img", &["compare", s(&out), s(&src)]), "compare");
        let v: serde_json::Value =
            serde_json::from_slice(&ok(ox(&["info", "--output=json", s(&vmdk)]), "info").stdout)
                .unwrap();
        assert_eq!(v["format"], "vmdk");
        assert_eq!(v["virtual-size"], 5 << 20);
    }
}

#[test]
fn hostile_images_exit_like_qemu() {
    let dir = tempdir();
    let d = dir.path();
    let img = d.join("bad.qcow2");
    ok(
        ox(&["create", "-q", "-f", "qcow2", s(&img), "1M"]),
        "create",
    );
    patch(&img, 72, &[0, 0, 0, 0, 0, 0x10, 0, 0]);
    let before = std::fs::read(&img).unwrap();
    for verb in [
        vec!["info"],
        vec!["check"],
        vec!["map", "--output=json"],
        vec!["convert", "-O", "raw"],
    ] {
        let mut args = verb.clone();
        args.push(s(&img));
        let dest = d.join("out.raw");
        if verb[0] == "convert" {
            args.push(s(&dest));
        }
        let out = ox(&args);
        assert_eq!(out.status.code(), Some(1), "{verb:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("bad.qcow2") && err.contains("incompatible_features"),
            "{verb:?}: {err}"
        );
        assert!(!dest.exists());
    }
    assert!(std::fs::read(&img).unwrap() == before, "file changed");
    if have_qemu() {
        assert_eq!(run("qemu-img", &["info", s(&img)]).status.code(), Some(1));
    }
}
