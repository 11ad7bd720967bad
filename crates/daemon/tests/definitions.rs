//! Definitions and the manager's checks, without a VMM: bad input gives a
//! clear error naming the file, line or field, and changes nothing on disk.

use std::path::{Path, PathBuf};

use daemon::config::{write_atomic, DomainDef};
use daemon::manager::{Manager, ManagerOptions};
use daemon::paths::Paths;
use daemon::settings::{Modify, Sizing};
use daemon::ManagerError;

fn kernel(dir: &Path) -> PathBuf {
    let path = dir.join("vmlinux");
    std::fs::write(&path, b"not booted by these tests").unwrap();
    path
}

fn toml(name: &str, kernel: &Path) -> String {
    format!(
        "name = \"{name}\"\nmemory = \"64m\"\nvcpus = 2\nkernel = \"{}\"\n",
        kernel.display()
    )
}

async fn manager(dir: &Path) -> Manager {
    Manager::open(ManagerOptions {
        paths: Paths::under(dir),
        vmm_binary: PathBuf::from("/nonexistent/oxvirt"),
        cgroups: None,
        network: None,
        default_pool: false,
    })
    .await
    .unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn toml_errors_name_the_line() {
    let text = "name = \"a\"\nkernel = \"/k\"\nmemory = = 3\n";
    let err = DomainDef::parse(text, "a.toml").unwrap_err().to_string();
    assert!(err.starts_with("a.toml: line 3:"), "{err}");
}

#[test]
fn unknown_keys_are_errors_with_their_line() {
    let text = "name = \"a\"\nkernel = \"/k\"\n\n[resources]\ncpu_share = 5\n";
    let err = DomainDef::parse(text, "a.toml").unwrap_err().to_string();
    assert!(
        err.contains("line 5") && err.contains("unknown field `cpu_share`"),
        "{err}"
    );
    let err = DomainDef::parse("name = \"a\"\nkernel = \"/k\"\ncolour = 1\n", "a.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("line 3") && err.contains("colour"), "{err}");
}

#[test]
fn bad_sizes_and_values_are_reported() {
    let err = DomainDef::parse(
        "name = \"a\"\nkernel = \"/k\"\nmemory = \"12 parsecs\"\n",
        "a.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("line 3"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    let check = |extra: &str, field: &str| {
        let def = DomainDef::parse(&format!("{}{extra}", toml("a", &k)), "a.toml").unwrap();
        let err = def.validate().unwrap_err();
        assert!(err.to_string().contains(field), "{extra}: {err}");
    };
    check("[resources]\ncpu_shares = 1\n", "resources.cpu_shares");
    check("[resources]\ncpus = 0.001\n", "resources.cpus");
    check(
        "[resources]\ncpuset_cpus = \"3-1\"\n",
        "resources.cpuset_cpus",
    );
    check(
        "[resources]\nmemory_limit = \"1m\"\n",
        "resources.memory_limit",
    );
    check(
        "[resources]\nmemory_swap = \"1g\"\n",
        "resources.memory_swap",
    );
    check("[resources.vcpupin]\n7 = \"0\"\n", "resources.vcpupin");
    check(
        "[resources]\ndevice_read_bps = [\"vda:1mb\"]\n",
        "resources.device_read_bps",
    );
    let def = DomainDef::parse(&toml("a", &k).replace("vcpus = 2", "vcpus = 0"), "a.toml").unwrap();
    assert!(def.validate().unwrap_err().to_string().contains("vcpus"));
    let def = DomainDef::parse(&toml("a", &k).replace("64m", "3m"), "a.toml").unwrap();
    assert!(def.validate().unwrap_err().to_string().contains("memory"));
}

#[test]
fn names_that_could_escape_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    for name in ["../etc", "a/b", ".hidden", "", "-x", "a b"] {
        let def = DomainDef::parse(&toml(name, &k), "t").unwrap();
        let err = def.validate().unwrap_err().to_string();
        assert!(err.contains("name"), "{name:?}: {err}");
    }
}

#[test]
fn definitions_round_trip_through_toml() {
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    let text = format!(
        "{}cmdline = \"probe=hello\"\n[resources]\ncpu_shares = 512\ncpus = 1.5\nmemory_limit = \"160m\"\nmemory_swap = -1\n[resources.vcpupin]\n1 = \"0-1\"\n",
        toml("a", &k)
    );
    let def = DomainDef::parse(&text, "t").unwrap();
    def.validate().unwrap();
    assert_eq!(def.resources.memory_limit.unwrap().0, 160 << 20);
    let again = DomainDef::parse(&def.to_toml().unwrap(), "t").unwrap();
    assert_eq!(again, def);
}

#[test]
fn atomic_write_replaces_whole_files_and_leaves_no_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/a.toml");
    write_atomic(&path, b"one").unwrap();
    write_atomic(&path, b"two").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"two");
    assert_eq!(files(&dir.path().join("sub")), vec!["a.toml"]);
}

#[tokio::test]
async fn define_checks_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    let m = manager(dir.path()).await;
    let domains = Paths::under(dir.path()).domains_dir();

    let err = m
        .define("name = \"a\"\nkernel = [\n", "bad.toml")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "parse_error");
    assert!(err.to_string().starts_with("bad.toml: line "), "{err}");

    let err = m
        .define(&format!("{}vcpu = 2\n", toml("a", &k)), "typo.toml")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown field `vcpu`"), "{err}");

    let missing = toml("a", &dir.path().join("no-such-kernel"));
    let err = m.define(&missing, "a.toml").await.unwrap_err();
    assert_eq!(
        (err.code(), err.field()),
        ("invalid_argument", Some("kernel"))
    );
    assert!(err.to_string().contains("no-such-kernel"), "{err}");
    assert!(
        files(&domains).is_empty(),
        "nothing written: {:?}",
        files(&domains)
    );

    m.define(&toml("a", &k), "a.toml").await.unwrap();
    let before = std::fs::read_to_string(domains.join("a.toml")).unwrap();
    let err = m
        .define(&toml("a", &k).replace("64m", "128m"), "a2.toml")
        .await
        .unwrap_err();
    assert!(matches!(err, ManagerError::Exists { .. }), "{err}");
    assert_eq!(
        std::fs::read_to_string(domains.join("a.toml")).unwrap(),
        before
    );
    assert_eq!(files(&domains), vec!["a.toml"]);
}

#[tokio::test]
async fn definitions_survive_a_manager_restart_and_broken_files_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    {
        let m = manager(dir.path()).await;
        m.define(&toml("keep", &k), "keep.toml").await.unwrap();
        m.define(&toml("gone", &k), "gone.toml").await.unwrap();
        m.set_autostart("keep", true).unwrap();
        m.undefine("gone", false, false).await.unwrap();
    }
    let domains = Paths::under(dir.path()).domains_dir();
    std::fs::write(domains.join("broken.toml"), "name = \n").unwrap();
    let m = manager(dir.path()).await;
    let names: Vec<String> = m.list(true).into_iter().map(|d| d.name).collect();
    assert_eq!(names, vec!["keep"]);
    let info = m.info("keep").unwrap();
    assert!(info.autostart && info.persistent);
    // Autostart tried and failed (no VMM binary): the domain stays defined, shut off.
    assert_eq!(
        m.state("keep").unwrap().state,
        daemon::domain::State::ShutOff
    );
    assert_eq!(m.config_text("keep").unwrap(), toml("keep", &k));
}

#[tokio::test]
async fn verbs_on_inactive_or_unknown_domains_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    let m = manager(dir.path()).await;
    m.define(&toml("a", &k), "a.toml").await.unwrap();
    for err in [
        m.suspend("a").await.unwrap_err(),
        m.destroy("a").await.unwrap_err(),
        m.reboot("a").await.unwrap_err(),
    ] {
        assert_eq!(err.code(), "invalid_state", "{err}");
        assert!(err.to_string().contains("\"a\" is shut off"), "{err}");
    }
    let err = m.info("nope").unwrap_err();
    assert_eq!((err.code(), err.http_status()), ("not_found", 404));
    let err = m.start("a").await.unwrap_err();
    assert_eq!(err.code(), "start_failed", "{err}");
    assert!(err.to_string().contains("/nonexistent/oxvirt"), "{err}");
    assert_eq!(m.state("a").unwrap().state, daemon::domain::State::ShutOff);
    assert!(files(&Paths::under(dir.path()).running_dir()).is_empty());
}

#[test]
fn device_sections_are_checked_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let k = kernel(dir.path());
    let img = dir.path().join("disk.qcow2");
    std::fs::write(&img, b"").unwrap();
    let text = format!(
        "{}rng = true\n[[disk]]\npath = \"{}\"\nformat = \"qcow2\"\nthrottle = {{ read_bps = 1048576 }}\n[[nic]]\nmac = \"52:54:00:aa:bb:cc\"\n",
        toml("a", &k),
        img.display()
    );
    let def = DomainDef::parse(&text, "a.toml").unwrap();
    def.validate().unwrap();
    assert_eq!(def.disks[0].throttle.read_bps, Some(1 << 20));
    assert_eq!(
        DomainDef::parse(&def.to_toml().unwrap(), "again").unwrap(),
        def
    );
    let check = |extra: &str, field: &str, line: Option<usize>| {
        let text = format!("{}{extra}", toml("a", &k));
        match DomainDef::parse(&text, "a.toml") {
            Ok(def) => {
                let err = def.validate().unwrap_err();
                assert_eq!(err.field(), Some(field), "{extra}: {err}");
            }
            Err(err) => {
                let line = line.expect("a parse error");
                assert!(err.to_string().contains(&format!("line {line}")), "{err}");
            }
        }
    };
    check("[[disk]]\npath = \"/no/such.img\"\n", "disk.path", None);
    check(
        &format!(
            "[[disk]]\npath = \"{}\"\ncache = \"sometimes\"\n",
            img.display()
        ),
        "disk.cache",
        None,
    );
    check(
        &format!("[[disk]]\npath = \"{}\"\nserial = \"a,b\"\n", img.display()),
        "disk.serial",
        None,
    );
    check("[[disk]]\npath = \"/tmp\"\nsize = 5\n", "", Some(7));
    check("[[nic]]\nmac = \"01:00:5e:00:00:01\"\n", "nic.mac", None);
    check("[[nic]]\nnetwork = \"no where\"\n", "nic.network", None);
    check("max_memory = \"32m\"\n", "max_memory", None);
    check(
        "[resources]\nvcpu_sched = \"idle\"\n",
        "resources.vcpu_sched",
        None,
    );
    check(
        "[resources]\ndevice_read_bps = [\"vda:1mb\"]\n",
        "resources.device_read_bps",
        None,
    );
}

#[tokio::test]
async fn setvcpus_setmem_setmaxmem_change_the_definition() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager(dir.path()).await;
    let k = kernel(dir.path());
    let text = format!("{}[resources.vcpupin]\n1 = \"0\"\n", toml("a", &k));
    m.define(&text, "a.toml").await.unwrap();
    let config = Modify {
        live: false,
        config: true,
    };
    let set = |vcpus, memory, max_memory| Sizing {
        vcpus,
        memory,
        max_memory,
    };
    let s = m
        .set_sizing("a", &set(None, None, Some(256 << 20)), config)
        .unwrap();
    assert_eq!(s, set(Some(2), Some(64 << 20), Some(256 << 20)));
    m.set_sizing("a", &set(None, Some(128 << 20), None), config)
        .unwrap();
    // Above the maximum, or unpinning by shrinking: refused, nothing changes.
    let before = std::fs::read_to_string(dir.path().join("state/domains/a.toml")).unwrap();
    let err = m
        .set_sizing("a", &set(None, Some(512 << 20), None), config)
        .unwrap_err();
    assert_eq!(err.field(), Some("max_memory"), "{err}");
    let err = m
        .set_sizing("a", &set(Some(1), None, None), config)
        .unwrap_err();
    assert!(
        err.to_string().contains("vCPU 1 has a vcpupin entry"),
        "{err}"
    );
    let after = std::fs::read_to_string(dir.path().join("state/domains/a.toml")).unwrap();
    assert_eq!(before, after);
    // The maximum pulls the memory down with it, as in virsh.
    let s = m
        .set_sizing("a", &set(Some(4), None, Some(96 << 20)), config)
        .unwrap();
    assert_eq!(s, set(Some(4), Some(96 << 20), Some(96 << 20)));
    let def = DomainDef::load(&dir.path().join("state/domains/a.toml")).unwrap();
    assert_eq!((def.vcpus, def.memory.0), (4, 96 << 20));
}
