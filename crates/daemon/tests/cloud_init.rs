//! `[cloud_init]` and `oxvirt run --cloud-init`: the daemon writes the
//! NoCloud seed and its VMM shows it as a read-only raw disk; undefine
//! (or a transient domain's end) removes it; bad inputs are refused by
//! field.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{prerequisites, Daemon};
use daemon::client::block_on;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
/// Runs until stopped.
const CMDLINE: &str = "probe=mem probe.mib=8 probe.dirty_mib_s=1";

fn seed_of(d: &Daemon, name: &str) -> PathBuf {
    d.state_dir().join(format!("cloud-init/{name}.iso"))
}

/// The VMM's `query-block` entry for the seed.
fn seed_block(d: &Daemon, name: &str) -> Value {
    let socket = d.run_dir().join(format!("domains/{name}/api.sock"));
    let blocks = block_on(daemon::vmm_client::execute(&socket, "query-block"))
        .unwrap()
        .unwrap();
    blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["device"] == "cidata")
        .cloned()
        .unwrap_or_else(|| panic!("no cidata disk in {blocks}"))
}

/// A file of the seed as Rock Ridge names it (isoinfo), else None.
fn iso_file(iso: &Path, name: &str) -> Option<Vec<u8>> {
    let out = Command::new("isoinfo")
        .args(["-R", "-i"])
        .arg(iso)
        .args(["-x", &format!("/{name}")])
        .output()
        .ok()?;
    Some(out.stdout)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn heavy_cloud_init_seed_is_attached_read_only_and_removed_on_undefine() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    let user = write(
        d.dir.path(),
        "user-data",
        "#cloud-config\nhostname: seeded\n",
    );
    let net = write(
        d.dir.path(),
        "network-config",
        "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n",
    );
    let extra = format!(
        "[cloud_init]\nuser_data = \"{}\"\nnetwork_config = \"{}\"\n",
        user.display(),
        net.display()
    );
    let def = d.definition("ci", CMDLINE, &extra);
    d.ok(&["define", def.to_str().unwrap()]);
    let seed = seed_of(&d, "ci");
    assert!(
        !seed.exists(),
        "the seed is written at start, not at define"
    );
    d.ok(&["start", "ci"]);
    let block = seed_block(&d, "ci");
    assert_eq!(block["inserted"]["ro"], true, "{block}");
    assert_eq!(block["inserted"]["drv"], "raw", "{block}");
    assert_eq!(block["inserted"]["file"], seed.to_str().unwrap(), "{block}");
    if let Some(data) = iso_file(&seed, "user-data") {
        assert_eq!(data, std::fs::read(&user).unwrap());
        assert_eq!(
            iso_file(&seed, "network-config").unwrap(),
            std::fs::read(&net).unwrap()
        );
        assert_eq!(
            String::from_utf8(iso_file(&seed, "meta-data").unwrap()).unwrap(),
            "{\n\"instance-id\": \"ci\",\n\"local-hostname\": \"ci\"\n}\n"
        );
    }
    let config = d.ok(&["dumpconfig", "ci"]);
    assert!(config.contains("[cloud_init]"), "{config}");
    d.ok(&["destroy", "ci"]);
    d.wait_state("ci", "shut off", WAIT);
    assert!(
        seed.exists(),
        "a defined domain keeps its seed while shut off"
    );
    d.ok(&["undefine", "ci"]);
    assert!(!seed.exists(), "undefine leaves {seed:?}");
}

#[test]
fn heavy_cloud_init_run_flag_seeds_a_transient_domain() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    let user = write(d.dir.path(), "user-data", "#cloud-config\n");
    let meta = write(d.dir.path(), "meta-data", "instance-id: run-1\n");
    let spec = format!("user-data={},meta-data={}", user.display(), meta.display());
    let kernel = testkit::probe_binary();
    d.ok(&[
        "run",
        "--rm",
        "--name",
        "transient-ci",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cmdline",
        CMDLINE,
        "--memory",
        "64m",
        "--cloud-init",
        &spec,
    ]);
    let seed = seed_of(&d, "transient-ci");
    assert_eq!(seed_block(&d, "transient-ci")["inserted"]["ro"], true);
    if let Some(data) = iso_file(&seed, "meta-data") {
        assert_eq!(data, b"instance-id: run-1\n");
    }
    d.ok(&["destroy", "transient-ci"]);
    let deadline = std::time::Instant::now() + WAIT;
    while seed.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!seed.exists(), "a transient domain's seed outlives it");
}

#[test]
fn heavy_cloud_init_bad_inputs_are_refused_by_field() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    let missing = d.dir.path().join("no-such-user-data");
    let def = d.definition(
        "bad",
        CMDLINE,
        &format!("[cloud_init]\nuser_data = \"{}\"\n", missing.display()),
    );
    let err = d.fails(&["define", def.to_str().unwrap()]);
    assert!(
        err.contains("cloud_init.user_data") && err.contains("no-such-user-data"),
        "{err}"
    );
    let folder = d.definition(
        "bad",
        CMDLINE,
        &format!(
            "[cloud_init]\nvendor_data = \"{}\"\n",
            d.dir.path().display()
        ),
    );
    let err = d.fails(&["define", folder.to_str().unwrap()]);
    assert!(
        err.contains("cloud_init.vendor_data") && err.contains("not a regular file"),
        "{err}"
    );
    let unknown = d.definition("bad", CMDLINE, "[cloud_init]\nuserdata = \"/x\"\n");
    let err = d.fails(&["define", unknown.to_str().unwrap()]);
    assert!(err.contains("userdata"), "{err}");
    let kernel = testkit::probe_binary();
    let err = d.fails(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--cloud-init",
        "root-password-generate=on",
    ]);
    assert!(
        err.contains("--cloud-init") && err.contains("root-password-generate"),
        "{err}"
    );
    assert!(!d.state_dir().join("domains/bad.toml").exists());
    assert!(!d.state_dir().join("cloud-init").exists());
}
