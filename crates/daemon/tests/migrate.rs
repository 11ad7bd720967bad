//! migrate --live between two real oxvirtd instances: the probe's `mem`
//! workload checks its memory every pass, so a guest that counts on at the
//! destination (without booting there) arrived whole.

mod common;

use std::time::{Duration, Instant};

use common::{prerequisites, read, Daemon};

const WAIT: Duration = Duration::from_secs(30);
const CHECKER: &str = "probe=mem probe.mib=8 probe.dirty_mib_s=8 probe.verify=1";

fn last_pass(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split("pass=").nth(1)?.split(' ').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

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

#[test]
fn heavy_live_migration_moves_a_running_guest_to_another_daemon() {
    if !prerequisites() {
        return;
    }
    let source = Daemon::start();
    let target = Daemon::start();
    let file = source.definition("mover", CHECKER, "");
    source.ok(&["define", file.to_str().unwrap()]);
    source.ok(&["start", "mover"]);
    let before = last_pass(&wait_pass(&source, "mover", 1));
    source.ok(&["migrate-setspeed", "mover", "512"]);
    source.ok(&["migrate-setmaxdowntime", "mover", "500"]);
    assert!(source
        .ok(&["domjobinfo", "mover"])
        .contains("Job type:             None"));

    // A destination nobody serves: refused, and the guest runs on here.
    let nowhere = source.dir.path().join("nobody.sock");
    let err = source.fails(&["migrate", "--live", "mover", nowhere.to_str().unwrap()]);
    assert!(
        err.contains("destination") && err.contains("nobody.sock"),
        "{err}"
    );
    assert_eq!(source.ok(&["domstate", "mover"]), "running\n");

    let dest = target.socket();
    let out = source.ok(&[
        "migrate",
        "--live",
        "--persistent",
        "mover",
        dest.to_str().unwrap(),
    ]);
    assert!(out.contains("Domain 'mover' migrated"), "{out}");
    assert_eq!(
        source.ok(&["domstate", "mover", "--reason"]),
        "shut off (migrated)\n"
    );
    assert_eq!(
        target.ok(&["domstate", "mover", "--reason"]),
        "running (migrated in)\n"
    );
    let log = wait_pass(&target, "mover", before);
    assert!(
        !log.contains("fill_mib="),
        "booted again at the destination: {log}"
    );
    assert!(log.contains("verify=ok") && !log.contains("fail"), "{log}");
    // --persistent defined it at the destination; its VMM is in cgroups.
    assert!(read(&target.state_dir().join("domains/mover.toml")).contains("name = \"mover\""));
    let info = target.info("mover");
    assert_eq!(info.vcpu_tids.len(), 1);
    assert!(!info.cgroups.is_empty());
    target.ok(&["destroy", "mover"]);
}
