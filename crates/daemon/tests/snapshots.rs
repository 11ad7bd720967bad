//! Live snapshots with memory on real VMMs: the probe's `mem` workload
//! checks its memory on every pass and numbers its passes, so a guest that
//! counts on from the snapshot's pass (without booting again) after a
//! revert runs from the snapshot's memory, intact. The disk's half of the
//! snapshot is checked with qemu-io and qemu-img.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{prerequisites, read, Daemon};

const WAIT: Duration = Duration::from_secs(30);
/// Fills 8 MiB, then re-dirties and checks it about once a second.
const CHECKER: &str = "probe=mem probe.mib=8 probe.dirty_mib_s=8 probe.verify=1";

fn passes(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.split("pass=").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

fn console(d: &Daemon) -> String {
    std::fs::read_to_string(d.state_dir().join("log/keep.log")).unwrap_or_default()
}

/// Waits until the console, from byte `from` on, has `count` passes;
/// returns them.
fn passes_after(d: &Daemon, from: usize, count: usize) -> Vec<u64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = console(d);
        let seen = passes(log.get(from..).unwrap_or(""));
        if seen.len() >= count {
            return seen;
        }
        assert!(Instant::now() < deadline, "passes after byte {from}: {log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest booted once and every pass found its memory as it left it.
fn assert_one_life(d: &Daemon) {
    let log = console(d);
    assert_eq!(log.matches("fill_mib=").count(), 1, "booted again: {log}");
    assert!(
        log.contains("verify=ok") && !log.contains("verify=fail"),
        "{log}"
    );
}

fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img snapshot -l` (-U: the VMM may have the image open).
fn disk_snapshots(disk: &Path) -> String {
    tool(
        "qemu-img",
        &["snapshot", "-U", "-l", disk.to_str().unwrap()],
    )
}

fn assert_state(d: &Daemon, want: &str) {
    assert_eq!(d.ok(&["domstate", "keep", "--reason"]), format!("{want}\n"));
}

#[test]
fn heavy_live_snapshot_with_memory_reverts_the_running_guest() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    let disk = d.dir.path().join("keep.qcow2");
    let disk_arg = disk.to_str().unwrap();
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", disk_arg, "16M"],
    );
    let file = d.definition(
        "keep",
        CHECKER,
        &format!("[[disk]]\npath = \"{disk_arg}\"\n"),
    );
    d.ok(&["define", file.to_str().unwrap()]);
    d.ok(&["start", "keep"]);
    passes_after(&d, 0, 2);

    // Taken while it runs: the guest pauses, then counts on, same life.
    let out = d.ok(&["snapshot-create-as", "keep", "live", "memory and disk"]);
    assert!(out.contains("Domain snapshot live created"), "{out}");
    let at_snapshot = *passes(&console(&d)).last().unwrap();
    assert_state(&d, "running (booted)");
    let memory = d.state_dir().join("snapshots/keep/memory/live.state");
    assert!(memory.is_file());
    assert!(disk_snapshots(&disk).contains("live"));
    let list = d.ok(&["snapshot-list", "keep"]);
    let line = list.lines().find(|l| l.contains("live")).unwrap();
    assert!(line.contains("running") && line.ends_with("yes"), "{list}");
    let mark = console(&d).len();
    passes_after(&d, mark, 3);
    assert_one_life(&d);

    // The disk changes after the snapshot (while shut off, by qemu-io);
    // the revert brings back the disk and runs the guest from its memory.
    d.ok(&["destroy", "keep"]);
    tool("qemu-io", &["-c", "write -P 0xaa 0 64k", disk_arg]);
    let before_revert = *passes(&console(&d)).last().unwrap();
    assert!(before_revert >= at_snapshot + 3);
    let mark = console(&d).len();
    d.ok(&["snapshot-revert", "keep", "live"]);
    assert_state(&d, "running (from snapshot)");
    let after = passes_after(&d, mark, 2);
    assert!(
        after[0] <= at_snapshot + 1,
        "counted on from pass {} after a snapshot at pass {at_snapshot}",
        after[0]
    );
    assert_one_life(&d);
    d.ok(&["destroy", "keep"]);
    tool("qemu-io", &["-c", "read -P 0 0 64k", disk_arg]);

    // A paused domain's snapshot comes back paused; a shut-off domain's
    // snapshot has no memory and reverting to it stops the domain.
    d.ok(&["start", "keep"]);
    passes_after(&d, console(&d).len(), 1);
    d.ok(&["suspend", "keep"]);
    d.ok(&["snapshot-create-as", "keep", "asleep"]);
    assert_state(&d, "paused (user)");
    d.ok(&["resume", "keep"]);
    d.ok(&["destroy", "keep"]);
    d.ok(&["snapshot-create-as", "keep", "off"]);
    d.ok(&["start", "keep"]);
    d.ok(&["snapshot-revert", "keep", "asleep"]);
    assert_state(&d, "paused (from snapshot)");
    // Its VMM started it paused: the guest has not run since the revert.
    let mark = console(&d).len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        console(&d).len(),
        mark,
        "the reverted guest ran while paused"
    );
    d.ok(&["resume", "keep"]);
    passes_after(&d, mark, 2);
    d.ok(&["snapshot-revert", "keep", "off"]);
    assert_state(&d, "shut off (from snapshot)");
    let list = d.ok(&["snapshot-list", "keep"]);
    let off = list.lines().find(|l| l.contains("off ")).unwrap();
    assert!(off.contains("shutoff") && off.ends_with("no"), "{list}");

    // Deleting from a running domain releases its disks for a moment:
    // the snapshot leaves disk and state folder, the guest counts on.
    d.ok(&["snapshot-revert", "keep", "live"]);
    let mark = console(&d).len();
    d.ok(&["snapshot-delete", "keep", "live"]);
    assert_state(&d, "running (from snapshot)");
    assert!(!memory.exists());
    let listed = disk_snapshots(&disk);
    assert!(
        !listed.contains("live") && listed.contains("asleep"),
        "{listed}"
    );
    let after = passes_after(&d, mark, 2);
    assert!(after[1] > after[0], "{after:?}");

    let err = d.fails(&["snapshot-revert", "keep", "live"]);
    assert!(err.contains("\"live\": no such snapshot"), "{err}");
    let err = d.fails(&["snapshot-create-as", "keep", "asleep"]);
    assert!(err.contains("exists"), "{err}");
    d.ok(&["destroy", "keep"]);
    d.ok(&["snapshot-delete", "keep", "asleep"]);
    d.ok(&["snapshot-delete", "keep", "off"]);
    assert!(tool("qemu-img", &["check", disk_arg]).contains("No errors"));
    assert!(read(&d.state_dir().join("log/keep.log")).contains("verify=ok"));
}
