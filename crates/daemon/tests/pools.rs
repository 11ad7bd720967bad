//! Storage pools and volumes (libvirt's `dir` pools): the library calls
//! the API runs, checked with real qemu-img; bad input names what is wrong
//! and changes nothing on disk; then the verbs through a real oxvirtd and
//! the `oxvirt` CLI, and a probe guest writing to a volume.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{prerequisites, read, Daemon};
use daemon::devices::Disk;
use daemon::disk_attach::AttachDisk;
use daemon::manager::{Manager, ManagerOptions};
use daemon::paths::Paths;
use daemon::pool::{PoolError, ResizeRequest, VolumeRequest};
use daemon::settings::Modify;
use daemon::ManagerError;
use serde_json::Value;

async fn manager(dir: &Path, default_pool: bool) -> Manager {
    Manager::open(ManagerOptions {
        paths: Paths::under(dir),
        vmm_binary: PathBuf::from("/nonexistent/oxvirt"),
        cgroups: None,
        network: None,
        default_pool,
    })
    .await
    .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_info(path: &Path) -> Value {
    let text = qemu_img(&["info", "--output=json", "-U", path.to_str().unwrap()]);
    serde_json::from_str(&text).unwrap()
}

fn volume(name: &str, capacity: &str, format: &str) -> VolumeRequest {
    VolumeRequest {
        name: name.into(),
        capacity: capacity.into(),
        format: Some(format.into()),
        ..VolumeRequest::default()
    }
}

/// Every file under `dir`, recursively, with its size: what "nothing
/// changed" compares.
fn tree(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            }
            out.push((e.path(), if meta.is_dir() { 0 } else { meta.len() }));
        }
    }
    out.sort();
    out
}

#[test]
fn the_default_pool_is_defined_on_the_first_start_only() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let m = manager(dir.path(), true).await;
        let pools = m.pools().list(true);
        assert_eq!(pools.len(), 1, "{pools:?}");
        let default = &pools[0];
        assert_eq!(default.name, "default");
        assert_eq!(default.target, dir.path().join("state/images"));
        assert_eq!(default.state, "running");
        assert!(default.autostart && default.persistent);
        assert!(default.capacity.unwrap() >= default.available.unwrap());
        assert_eq!(default.volumes, Some(0));
        assert!(default.target.is_dir());
        // An admin who removes it keeps it removed across restarts.
        m.pools().destroy("default").unwrap();
        m.pools().undefine("default").unwrap();
        drop(m);
        let m = manager(dir.path(), true).await;
        assert!(m.pools().list(true).is_empty());
    });
}

#[test]
fn an_active_pool_stays_active_and_autostart_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let m = manager(dir.path(), true).await;
        let target = dir.path().join("vms");
        let text = format!("name = \"vms\"\ntarget = \"{}\"\n", target.display());
        m.pools().define(&text, "vms.toml").unwrap();
        m.pools().build("vms").unwrap();
        m.pools().start("vms").unwrap();
        drop(m);
        // A daemon restart: both still active.
        let m = manager(dir.path(), true).await;
        let active: Vec<String> = m.pools().list(false).into_iter().map(|p| p.name).collect();
        assert_eq!(active, ["default", "vms"]);
        drop(m);
        // A host reboot empties the runtime folder: only autostart pools return.
        std::fs::remove_dir_all(dir.path().join("run")).unwrap();
        let m = manager(dir.path(), true).await;
        let active: Vec<String> = m.pools().list(false).into_iter().map(|p| p.name).collect();
        assert_eq!(active, ["default"]);
        m.pools().set_autostart("vms", true).unwrap();
        drop(m);
        std::fs::remove_dir_all(dir.path().join("run")).unwrap();
        let m = manager(dir.path(), true).await;
        assert!(m.pools().info("vms").unwrap().active);
    });
}

#[test]
fn pool_lifecycle_build_start_destroy_undefine_delete() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let m = manager(dir.path(), false).await;
        let p = m.pools();
        let target = dir.path().join("deep/vms");
        let text = format!(
            "name = \"vms\"\ntype = \"dir\"\ntarget = \"{}\"\n",
            target.display()
        );
        let info = p.define(&text, "vms.toml").unwrap();
        assert_eq!((info.state.as_str(), info.capacity), ("inactive", None));
        assert_eq!(p.config_text("vms").unwrap(), text);

        // No folder yet: start says so, names it and how to make it.
        let before = tree(dir.path());
        let err = p.start("vms").unwrap_err().to_string();
        assert!(
            err.contains(&target.display().to_string()) && err.contains("pool-build vms"),
            "{err}"
        );
        assert_eq!(tree(dir.path()), before);

        p.build("vms").unwrap();
        assert!(target.is_dir());
        assert_eq!(p.start("vms").unwrap().state, "running");
        let err = p.start("vms").unwrap_err();
        assert!(matches!(err, PoolError::InvalidState { .. }), "{err}");
        let err = p.undefine("vms").unwrap_err().to_string();
        assert!(err.contains("pool-destroy"), "{err}");
        assert_eq!(p.refresh("vms").unwrap().volumes, Some(0));

        // A folder that vanishes under an active pool.
        std::fs::remove_dir(&target).unwrap();
        assert_eq!(p.info("vms").unwrap().state, "inaccessible");
        let err = p.volumes("vms").unwrap_err().to_string();
        assert!(err.contains("inaccessible"), "{err}");
        p.build("vms").unwrap();

        p.destroy("vms").unwrap();
        let err = p
            .create_volume("vms", &volume("a", "1M", "raw"))
            .unwrap_err();
        assert!(err.to_string().contains("pool-start vms"), "{err}");
        p.delete("vms").unwrap();
        assert!(!target.exists());
        p.undefine("vms").unwrap();
        assert!(matches!(p.info("vms"), Err(PoolError::NotFound { .. })));
    });
}

#[test]
fn volumes_are_images_qemu_img_reads() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let m = manager(dir.path(), true).await;
        let p = m.pools();
        let raw = p
            .create_volume(
                "default",
                &VolumeRequest {
                    allocation: Some("1M".into()),
                    ..volume("data.img", "64M", "raw")
                },
            )
            .unwrap();
        assert_eq!((raw.format.as_str(), raw.capacity), ("raw", 64 << 20));
        assert!(raw.allocation >= 1 << 20, "{raw:?}");
        let info = qemu_info(&raw.path);
        assert_eq!(info["format"], "raw");
        assert_eq!(info["virtual-size"], 64 << 20);

        let base = p
            .create_volume("default", &volume("base.qcow2", "1G", "qcow2"))
            .unwrap();
        assert_eq!(base.path, dir.path().join("state/images/base.qcow2"));
        let info = qemu_info(&base.path);
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["virtual-size"], 1u64 << 30);
        qemu_img(&["check", base.path.to_str().unwrap()]);

        // Guest data in the base, then an overlay backed by it.
        let dev = diskimg::open(&base.path, false, None).unwrap();
        dev.write_at(&[0xab; 65536], 1 << 20).unwrap();
        dev.flush().unwrap();
        drop(dev);
        let overlay = p
            .create_volume(
                "default",
                &VolumeRequest {
                    backing_vol: Some("base.qcow2".into()),
                    ..volume("web.qcow2", "2G", "qcow2")
                },
            )
            .unwrap();
        assert_eq!(overlay.backing.as_deref(), Some(base.path.as_path()));
        assert_eq!(overlay.backing_format.as_deref(), Some("qcow2"));
        let info = qemu_info(&overlay.path);
        assert_eq!(info["backing-filename"], base.path.to_str().unwrap());
        assert_eq!(info["backing-filename-format"], "qcow2");
        assert_eq!(info["virtual-size"], 2u64 << 30);
        qemu_img(&["check", overlay.path.to_str().unwrap()]);

        // The base cannot go while the overlay needs it.
        let err = p
            .delete_volume("default", "base.qcow2", &m.disk_users())
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"web.qcow2\" (its backing file)"), "{err}");

        // Resize: grow, shrinking needs --shrink, delta.
        let grown = p
            .resize_volume(
                "default",
                "base.qcow2",
                &ResizeRequest {
                    capacity: "1G".into(),
                    delta: true,
                    shrink: false,
                },
                &m.disk_users(),
            )
            .unwrap();
        assert_eq!(grown.capacity, 2 << 30);
        assert_eq!(qemu_info(&base.path)["virtual-size"], 2u64 << 30);
        let err = p
            .resize_volume(
                "default",
                "data.img",
                &ResizeRequest {
                    capacity: "32M".into(),
                    ..ResizeRequest::default()
                },
                &m.disk_users(),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("--shrink"), "{err}");
        assert_eq!(qemu_info(&raw.path)["virtual-size"], 64 << 20);

        // A clone is a flat copy with the same contents.
        let clone = p
            .clone_volume("default", "web.qcow2", "web2.qcow2", &m.disk_users())
            .unwrap();
        assert_eq!(clone.backing, None);
        assert_eq!(clone.capacity, 2 << 30);
        qemu_img(&["check", clone.path.to_str().unwrap()]);
        qemu_img(&[
            "compare",
            overlay.path.to_str().unwrap(),
            clone.path.to_str().unwrap(),
        ]);

        let names: Vec<String> = p
            .volumes("default")
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["base.qcow2", "data.img", "web.qcow2", "web2.qcow2"]);
        assert_eq!(p.volume_by_path(&overlay.path).unwrap().name, "web.qcow2");
        p.delete_volume("default", "web.qcow2", &m.disk_users())
            .unwrap();
        p.delete_volume("default", "base.qcow2", &m.disk_users())
            .unwrap();
        assert!(!base.path.exists());
    });
}

#[test]
fn bad_volume_requests_name_the_problem_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let m = manager(dir.path(), true).await;
        let p = m.pools();
        p.create_volume("default", &volume("taken.img", "1M", "raw"))
            .unwrap();
        let before = tree(dir.path());
        let cases: Vec<(&str, VolumeRequest, &str)> = vec![
            ("nopool", volume("a", "1M", "raw"), "\"nopool\" not found"),
            (
                "default",
                volume("a/b", "1M", "raw"),
                "must not contain '/'",
            ),
            (
                "default",
                volume(".a", "1M", "raw"),
                "must not start with '.'",
            ),
            ("default", volume("a", "10Q", "raw"), "capacity: \"10Q\""),
            (
                "default",
                volume("a", "1.5G", "raw"),
                "capacity: \"1.5G\": a whole number",
            ),
            (
                "default",
                volume("a", "1M", "vmdk"),
                "\"vmdk\": expected raw or qcow2",
            ),
            (
                "default",
                volume("taken.img", "1M", "raw"),
                "\"taken.img\" already exists",
            ),
            ("default", volume("huge", "16E", "raw"), "too large"),
            (
                "default",
                VolumeRequest {
                    backing_vol: Some("missing.qcow2".into()),
                    ..volume("a", "1M", "qcow2")
                },
                "\"missing.qcow2\" not found",
            ),
            (
                "default",
                VolumeRequest {
                    backing_vol: Some("taken.img".into()),
                    ..volume("a", "1M", "raw")
                },
                "need --format qcow2",
            ),
            (
                "default",
                VolumeRequest {
                    allocation: Some("1M".into()),
                    ..volume("a", "1M", "qcow2")
                },
                "allocation",
            ),
        ];
        for (pool, req, expected) in cases {
            let err = p.create_volume(pool, &req).unwrap_err().to_string();
            assert!(err.contains(expected), "{pool} {req:?}: {err}");
        }
        // qcow2's own limit comes back from diskimg, naming the volume.
        let err = p
            .create_volume("default", &volume("big", "8E", "qcow2"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("volume \"big\""), "{err}");
        assert_eq!(tree(dir.path()), before);

        let err = p
            .delete_volume("default", "nothere", &m.disk_users())
            .unwrap_err();
        assert!(matches!(err, PoolError::VolumeNotFound { .. }), "{err}");
        let err = p
            .clone_volume("default", "taken.img", "taken.img", &m.disk_users())
            .unwrap_err();
        assert!(matches!(err, PoolError::VolumeExists { .. }), "{err}");

        // Pool definitions: a TOML error's line, a bad name, a taken target.
        let err = p
            .define("name = \"x\"\ntarget = 5\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("x.toml: line 2:"), "{err}");
        let err = p
            .define("name = \"a/b\"\ntarget = \"/srv\"\n", "d")
            .unwrap_err();
        assert_eq!(err.field(), Some("name"), "{err}");
        let images = dir.path().join("state/images");
        let err = p
            .define(
                &format!("name = \"again\"\ntarget = \"{}\"\n", images.display()),
                "d",
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"default\"'s target"), "{err}");
        let err = p
            .define("name = \"default\"\ntarget = \"/srv/other\"\n", "d")
            .unwrap_err();
        assert!(matches!(err, PoolError::Exists { .. }), "{err}");
        assert_eq!(tree(dir.path()), before);
    });
}

#[test]
fn domain_disks_name_volumes_and_keep_them() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"not booted by this test").unwrap();
    runtime().block_on(async {
        let m = manager(dir.path(), true).await;
        let root = m
            .pools()
            .create_volume("default", &volume("root.qcow2", "1G", "qcow2"))
            .unwrap();
        let text = |vol: &str| {
            format!(
                "name = \"web\"\nmemory = \"64m\"\nkernel = \"{}\"\n\n[[disk]]\nvolume = \"{vol}\"\nformat = \"qcow2\"\n",
                kernel.display()
            )
        };
        // Unknown volumes and pools are named, and nothing is defined.
        for (vol, expected) in [
            ("default/none.qcow2", "volume \"none.qcow2\" not found"),
            ("nopool/root.qcow2", "storage pool \"nopool\" not found"),
            ("root.qcow2", "expected POOL/VOLUME"),
        ] {
            let err = m.define(&text(vol), "web.toml").await.unwrap_err();
            assert!(
                matches!(&err, ManagerError::Invalid { field: "disk.volume", .. }),
                "{err}"
            );
            assert!(err.to_string().contains(expected), "{vol}: {err}");
            assert!(err.to_string().contains("vda"), "{err}");
        }
        assert!(m.list(true).is_empty());

        m.define(&text("default/root.qcow2"), "web.toml").await.unwrap();
        let users = m.disk_users();
        assert_eq!(users.len(), 1);
        assert_eq!(users[0].path, root.path);
        let before = tree(dir.path());
        let err = m
            .pools()
            .delete_volume("default", "root.qcow2", &m.disk_users())
            .unwrap_err()
            .to_string();
        assert!(err.contains("in use by domain \"web\""), "{err}");
        assert_eq!(tree(dir.path()), before);
        // The definition keeps the volume, as written.
        assert!(m.config_text("web").unwrap().contains("volume = \"default/root.qcow2\""));

        // A restarted daemon resolves the volume again.
        drop(m);
        let m = manager(dir.path(), true).await;
        assert_eq!(m.disk_users()[0].path, root.path);
        m.undefine("web", false, false).await.unwrap();
        m.pools()
            .delete_volume("default", "root.qcow2", &m.disk_users())
            .unwrap();
    });
}

#[test]
fn attach_and_detach_disk_change_the_definition() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"not booted by this test").unwrap();
    let config = Modify {
        live: false,
        config: true,
    };
    runtime().block_on(async {
        let m = manager(dir.path(), true).await;
        for name in ["a.qcow2", "b.img"] {
            let format = if name.ends_with("qcow2") {
                "qcow2"
            } else {
                "raw"
            };
            m.pools()
                .create_volume("default", &volume(name, "16M", format))
                .unwrap();
        }
        let text = format!(
            "name = \"web\"\nmemory = \"64m\"\nkernel = \"{}\"\n",
            kernel.display()
        );
        m.define(&text, "web.toml").await.unwrap();
        let attach = |source: &str, target: Option<&str>| AttachDisk {
            disk: match source.starts_with('/') {
                true => Disk {
                    path: source.into(),
                    ..Disk::default()
                },
                false => Disk {
                    volume: Some(source.into()),
                    ..Disk::default()
                },
            },
            target: target.map(str::to_owned),
        };
        let disks = m
            .attach_disk("web", &attach("default/a.qcow2", Some("vda")), config)
            .await
            .unwrap();
        assert_eq!(disks[0].target, "vda");
        let b = dir.path().join("state/images/b.img");
        let disks = m
            .attach_disk("web", &attach(b.to_str().unwrap(), None), config)
            .await
            .unwrap();
        assert_eq!((disks[1].target.as_str(), &disks[1].path), ("vdb", &b));

        // Refused, naming why, with the definition unchanged.
        let before = m.config_text("web").unwrap();
        for (source, target, expected) in [
            ("default/a.qcow2", None, "the domain's vda already"),
            ("default/none", None, "volume \"none\" not found"),
            ("default/b.img", Some("vdf"), "the next one is vdc"),
            ("/nonexistent/disk.img", None, "No such file"),
        ] {
            let err = m
                .attach_disk("web", &attach(source, target), config)
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{source}: {err}");
        }
        let err = m
            .attach_disk(
                "web",
                &attach("default/b.img", None),
                Modify {
                    live: true,
                    config: false,
                },
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not running"), "{err}");
        let err = m
            .detach_disk("web", "vdc", config)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"vdc\": no such disk (the domain has vda, vdb)"),
            "{err}"
        );
        assert_eq!(m.config_text("web").unwrap(), before);

        // The attached volume is in use; detached, it can go.
        let err = m
            .pools()
            .delete_volume("default", "a.qcow2", &m.disk_users())
            .unwrap_err();
        assert!(matches!(err, PoolError::InUse { .. }), "{err}");
        let disks = m.detach_disk("web", "vda", config).await.unwrap();
        assert_eq!((disks.len(), disks[0].target.as_str()), (1, "vda"));
        assert_eq!(disks[0].path, b);
        m.pools()
            .delete_volume("default", "a.qcow2", &m.disk_users())
            .unwrap();
        // The definition on disk says the same after a restart.
        drop(m);
        let m = manager(dir.path(), true).await;
        let text = m.config_text("web").unwrap();
        assert!(
            text.contains("b.img") && !text.contains("a.qcow2"),
            "{text}"
        );
    });
}

/// virsh's table: the row whose first cell is `name`, split on spaces.
fn row(table: &str, name: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cells| cells.first().is_some_and(|c| c == name))
        .unwrap_or_else(|| panic!("no row {name} in\n{table}"))
}

#[test]
fn heavy_pool_and_volume_verbs_through_the_daemon() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    let images = d.state_dir().join("images");
    let list = d.ok(&["pool-list"]);
    assert!(list.starts_with(" Name"), "{list}");
    assert_eq!(row(&list, "default"), ["default", "active", "yes"]);

    let target = d.dir.path().join("vms");
    let target_s = target.to_str().unwrap();
    assert_eq!(
        d.ok(&["pool-define-as", "vms", "dir", "--target", target_s]),
        "Pool vms defined\n"
    );
    let err = d.fails(&["pool-start", "vms"]);
    assert!(
        err.contains("no such folder") && err.contains("pool-build vms"),
        "{err}"
    );
    d.ok(&["pool-build", "vms"]);
    assert_eq!(d.ok(&["pool-start", "vms"]), "Pool vms started\n");
    d.ok(&["pool-autostart", "vms"]);
    let details = d.ok(&["pool-list", "--all", "--details"]);
    let vms = row(&details, "vms");
    assert_eq!(&vms[..4], ["vms", "running", "yes", "yes"], "{details}");
    assert!(vms[5] == "GiB" || vms[5] == "TiB", "{details}");
    let info = d.ok(&["pool-info", "vms"]);
    assert!(info.contains("State:          running\n"), "{info}");
    assert!(d
        .ok(&["pool-dumpxml", "vms"])
        .contains(&format!("target = \"{target_s}\"")));

    assert_eq!(
        d.ok(&[
            "vol-create-as",
            "vms",
            "disk.qcow2",
            "1G",
            "--format",
            "qcow2"
        ]),
        "Vol disk.qcow2 created\n"
    );
    let path = target.join("disk.qcow2");
    assert_eq!(qemu_info(&path)["virtual-size"], 1u64 << 30);
    d.ok(&[
        "vol-create-as",
        "vms",
        "overlay.qcow2",
        "1G",
        "--format",
        "qcow2",
        "--backing-vol",
        "disk.qcow2",
        "--backing-vol-format",
        "qcow2",
    ]);
    assert_eq!(
        qemu_info(&target.join("overlay.qcow2"))["backing-filename"],
        path.to_str().unwrap()
    );
    let vols = d.ok(&["vol-list", "vms", "--details"]);
    let disk = row(&vols, "disk.qcow2");
    assert_eq!(
        &disk[1..5],
        [path.to_str().unwrap(), "file", "1.00", "GiB"],
        "{vols}"
    );
    assert_eq!(
        d.ok(&["vol-path", "--pool", "vms", "disk.qcow2"]),
        format!("{}\n", path.display())
    );
    let info = d.ok(&["vol-info", path.to_str().unwrap()]);
    assert!(
        info.starts_with(
            "Name:           disk.qcow2\nType:           file\nCapacity:       1.00 GiB\n"
        ),
        "{info}"
    );
    assert_eq!(
        d.ok(&["vol-resize", "vms/disk.qcow2", "2G"]),
        "Size of volume 'disk.qcow2' successfully changed to 2G\n"
    );
    assert_eq!(qemu_info(&path)["virtual-size"], 2u64 << 30);
    let err = d.fails(&["vol-resize", "vms/disk.qcow2", "-1G", "--delta"]);
    assert!(err.contains("--shrink"), "{err}");
    d.ok(&["vol-resize", "vms/disk.qcow2", "-1G", "--delta", "--shrink"]);
    assert_eq!(qemu_info(&path)["virtual-size"], 1u64 << 30);
    assert_eq!(
        d.ok(&["vol-clone", "--pool", "vms", "overlay.qcow2", "copy.qcow2"]),
        "Vol copy.qcow2 cloned from overlay.qcow2\n"
    );
    qemu_img(&["check", target.join("copy.qcow2").to_str().unwrap()]);

    // Bad input: the error names it, and the pool's folder is unchanged.
    let before = tree(&target);
    for (args, expected) in [
        (
            vec!["vol-create-as", "vms", "x.img", "10Q"],
            "capacity: \"10Q\"",
        ),
        (
            vec!["vol-create-as", "nopool", "x.img", "1M"],
            "\"nopool\" not found",
        ),
        (
            vec!["vol-create-as", "vms", "a/b", "1M"],
            "must not contain '/'",
        ),
        (vec!["vol-delete", "disk.qcow2"], "--pool POOL"),
        (
            vec!["vol-delete", "--pool", "vms", "disk.qcow2"],
            "\"overlay.qcow2\" (its backing file)",
        ),
        (
            vec!["vol-info", "/etc/passwd"],
            "no active storage pool holds",
        ),
        (vec!["pool-undefine", "vms"], "pool-destroy"),
    ] {
        let err = d.fails(&args);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    assert_eq!(tree(&target), before);

    assert_eq!(
        d.ok(&["vol-delete", "vms/copy.qcow2"]),
        "Vol copy.qcow2 deleted\n"
    );
    d.ok(&["vol-delete", "vms/overlay.qcow2"]);
    d.ok(&["vol-delete", "vms/disk.qcow2"]);
    assert_eq!(d.ok(&["pool-destroy", "vms"]), "Pool vms destroyed\n");
    assert_eq!(d.ok(&["pool-delete", "vms"]), "Pool vms deleted\n");
    assert!(!target.exists());
    assert_eq!(
        d.ok(&["pool-undefine", "vms"]),
        "Pool vms has been undefined\n"
    );
    assert!(images.is_dir());
}

/// A definition of the virtio probe running `cmdline` on the volume
/// `default/data.qcow2` (and `extra` in its [[disk]]).
fn define_on_volume(d: &Daemon, name: &str, cmdline: &str, extra: &str) {
    let path = d.dir.path().join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\nmemory = \"64m\"\nkernel = \"{}\"\ncmdline = \"{cmdline}\"\n\n[[disk]]\nvolume = \"default/data.qcow2\"\nformat = \"qcow2\"\n{extra}",
            testkit::probe_kernel_virtio().display()
        ),
    )
    .unwrap();
    d.ok(&["define", path.to_str().unwrap()]);
}

#[test]
fn heavy_a_guest_writes_to_a_volume() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    d.ok(&[
        "vol-create-as",
        "default",
        "data.qcow2",
        "32M",
        "--format",
        "qcow2",
    ]);
    define_on_volume(
        &d,
        "writer",
        "probe=blk probe.mode=seqwrite probe.mib=4 probe.bs=65536 probe.seed=7",
        "",
    );
    let err = d.fails(&["vol-delete", "default/data.qcow2"]);
    assert!(err.contains("in use by domain \"writer\""), "{err}");
    d.ok(&["start", "writer"]);
    d.wait_state("writer", "shut off", Duration::from_secs(30));
    let log = read(&d.state_dir().join("log/writer.log"));
    assert!(log.contains("PROBE DONE ok"), "{log}");

    // What the guest wrote is in the volume, as qemu-img reads it.
    let image = d.state_dir().join("images/data.qcow2");
    qemu_img(&["check", image.to_str().unwrap()]);
    let raw = d.dir.path().join("data.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let data = std::fs::read(&raw).unwrap();
    for (sector, chunk) in data[..4 << 20].chunks(512).enumerate() {
        let want = (sector as u64 ^ 7).to_le_bytes();
        assert!(chunk.chunks(8).all(|w| w == want), "sector {sector}");
    }

    // A guest reading it slowly keeps it open: no resize, clone or hotplug.
    define_on_volume(
        &d,
        "reader",
        "probe=blk probe.mode=seqread probe.mib=30 probe.bs=65536",
        "throttle = { read_bps = 1048576 }\n",
    );
    d.ok(&["start", "reader"]);
    for (args, expected) in [
        (
            vec!["vol-resize", "default/data.qcow2", "64M"],
            "running domain \"reader\"",
        ),
        (
            vec!["vol-clone", "default/data.qcow2", "copy.qcow2"],
            "running domain \"reader\"",
        ),
        (
            vec!["attach-disk", "reader", "/etc/hostname", "vdb"],
            "no disk hotplug",
        ),
    ] {
        let err = d.fails(&args);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    assert_eq!(qemu_info(&image)["virtual-size"], 32 << 20);
    d.ok(&["destroy", "reader"]);
    d.ok(&["undefine", "reader"]);
    d.ok(&["undefine", "writer"]);
    d.ok(&["vol-delete", "default/data.qcow2"]);
    assert!(!image.exists());
}
