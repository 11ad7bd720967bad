//! managedsave, save and restore on real VMMs: the probe's `mem` workload
//! checks its memory on every pass, so a guest that carries on counting
//! passes (and never boots again) came back with its memory intact.

mod common;

use std::time::{Duration, Instant};

use common::{prerequisites, read, Daemon};

const WAIT: Duration = Duration::from_secs(30);
/// Fills 8 MiB, then re-dirties and checks it about once a second.
const CHECKER: &str = "probe=mem probe.mib=8 probe.dirty_mib_s=8 probe.verify=1";

/// The highest pass number in the console log.
fn last_pass(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split("pass=").nth(1)?.split(' ').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Waits until the guest has counted past `pass`; returns the log.
fn wait_pass(d: &Daemon, name: &str, pass: u64) -> String {
    let log = d.state_dir().join(format!("log/{name}.log"));
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if last_pass(&text) > pass {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stuck at pass {pass}: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest booted once and every pass found its memory as it left it.
fn assert_one_life(log: &str) {
    assert_eq!(log.matches("fill_mib=").count(), 1, "booted again: {log}");
    assert!(
        !log.contains("verify=fail") && !log.contains("PROBE DONE fail"),
        "{log}"
    );
    assert!(log.contains("verify=ok"), "{log}");
}

#[test]
fn heavy_managedsave_save_and_restore_carry_on_where_the_guest_was() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    let file = d.definition("keep", CHECKER, "");
    d.ok(&["define", file.to_str().unwrap()]);
    let err = d.fails(&["managedsave", "keep"]);
    assert!(err.contains("shut off: cannot save"), "{err}");
    d.ok(&["start", "keep"]);
    let before = last_pass(&wait_pass(&d, "keep", 1));

    d.ok(&["managedsave", "keep"]);
    assert_eq!(
        d.ok(&["domstate", "keep", "--reason"]),
        "shut off (saved)\n"
    );
    assert!(d.ok(&["dominfo", "keep"]).contains("Managed save:   yes"));
    let managed = d.state_dir().join("save/keep.state");
    assert!(managed.is_file());
    d.ok(&["start", "keep"]);
    assert_eq!(
        d.ok(&["domstate", "keep", "--reason"]),
        "running (restored)\n"
    );
    assert!(!managed.exists(), "the managed save is used up");
    let log = wait_pass(&d, "keep", before + 1);
    assert_one_life(&log);

    // save writes the state and the definition; restore runs it again.
    let state = d.dir.path().join("keep.state");
    d.ok(&["save", "keep", state.to_str().unwrap()]);
    assert_eq!(
        d.ok(&["domstate", "keep", "--reason"]),
        "shut off (saved)\n"
    );
    let beside = d.dir.path().join("keep.state.domain.toml");
    assert!(read(&beside).contains("name = \"keep\""));
    let saved_at = last_pass(&read(&d.state_dir().join("log/keep.log")));
    let out = d.ok(&["restore", state.to_str().unwrap()]);
    assert!(out.contains("Domain 'keep' restored"), "{out}");
    let log = wait_pass(&d, "keep", saved_at + 1);
    assert_one_life(&log);

    let missing = d.dir.path().join("nothing.state");
    let err = d.fails(&["restore", missing.to_str().unwrap()]);
    assert!(err.contains("nothing.state.domain.toml"), "{err}");
    d.ok(&["destroy", "keep"]);
}
