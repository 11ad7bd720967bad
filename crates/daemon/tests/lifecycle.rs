//! Real oxvirtd, real `oxvirt vmm` processes, the probe guest and this
//! machine's cgroups: the lifecycle verbs, supervision, daemon restarts.

mod common;

use std::time::Duration;

use common::{prerequisites, read, thread_cgroups, Daemon};
use daemon::client::{block_on, ClientError};
use hyper::Method;

/// A guest that runs until stopped (the probe's mem workload, rate-limited).
const FOREVER: &str = "probe=mem probe.mib=8 probe.dirty_mib_s=4";
const WAIT: Duration = Duration::from_secs(15);

#[test]
fn heavy_lifecycle_define_start_suspend_resume_shutdown_destroy_undefine() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    let file = d.definition("web", FOREVER, "vcpus = 2\n");
    let out = d.ok(&["define", file.to_str().unwrap()]);
    assert!(out.contains("Domain 'web' defined"), "{out}");
    let stored = d.state_dir().join("domains/web.toml");
    assert_eq!(read(&stored), read(&file));
    assert!(d.ok(&["list", "--all"]).contains("shut off"));
    assert_eq!(d.ok(&["list", "--name"]), "");

    d.ok(&["start", "web"]);
    let info = d.info("web");
    let pid = info.pid.expect("a running domain has a VMM pid");
    assert_eq!(info.vcpu_tids.len(), 2);
    assert_eq!(d.ok(&["list", "--name"]), "web\n");
    assert_eq!(d.ok(&["domstate", "web", "--reason"]), "running (booted)\n");
    // The VMM sits in `emulator`, each vCPU thread in its own group.
    assert!(thread_cgroups(pid, pid).contains(&format!("{}/web/emulator", d.cgroup_parent)));
    for (i, tid) in info.vcpu_tids.iter().enumerate() {
        assert!(
            thread_cgroups(pid, *tid).contains(&format!("{}/web/vcpu{i}", d.cgroup_parent)),
            "vcpu{i}"
        );
    }

    // Bad requests on a running domain change nothing.
    let err = d.fails(&["start", "web"]);
    assert!(
        err.contains("domain \"web\" is running: cannot start"),
        "{err}"
    );
    let err = d.fails(&["undefine", "web"]);
    assert!(err.contains("without --force"), "{err}");
    assert!(stored.exists());
    let err = d.fails(&["define", file.to_str().unwrap()]);
    assert!(err.contains("already exists"), "{err}");

    // Suspended vCPUs use no CPU; resumed ones do again.
    d.ok(&["suspend", "web"]);
    assert_eq!(d.ok(&["domstate", "web", "--reason"]), "paused (user)\n");
    let cpu = |d: &Daemon| d.info("web").cpu_time_ns.expect("cpu accounting");
    std::thread::sleep(Duration::from_millis(200));
    let paused_from = cpu(&d);
    std::thread::sleep(Duration::from_millis(500));
    let paused_used = cpu(&d) - paused_from;
    d.ok(&["resume", "web"]);
    assert_eq!(
        d.ok(&["domstate", "web", "--reason"]),
        "running (unpaused)\n"
    );
    let running_from = cpu(&d);
    std::thread::sleep(Duration::from_millis(500));
    let running_used = cpu(&d) - running_from;
    assert!(
        paused_used < 50_000_000,
        "paused domain used {paused_used} ns"
    );
    assert!(
        running_used > 5 * paused_used.max(10_000_000),
        "running {running_used} ns vs paused {paused_used} ns"
    );

    d.ok(&["reboot", "web"]);
    assert_eq!(d.info("web").pid, Some(pid));

    let run_dir = d.run_dir().join("domains/web");
    let cgroup = d.cgroup_dir("cpu", "web", "");
    assert!(run_dir.join("api.sock").exists() && cgroup.exists());
    d.ok(&["shutdown", "web", "--timeout", "1"]);
    assert_eq!(
        d.ok(&["domstate", "web", "--reason"]),
        "shut off (shutdown)\n"
    );
    assert!(!run_dir.exists(), "runtime folder left behind");
    assert!(!cgroup.exists(), "cgroup left behind");
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err(),
        "VMM still alive"
    );

    d.ok(&["start", "web"]);
    d.ok(&["destroy", "web"]);
    assert_eq!(
        d.ok(&["domstate", "web", "--reason"]),
        "shut off (destroyed)\n"
    );
    assert!(d.ok(&["dumpconfig", "web"]).contains("name = \"web\""));

    d.ok(&["undefine", "web"]);
    assert!(!stored.exists());
    assert_eq!(d.ok(&["list", "--all", "--name"]), "");
    let err = d.fails(&["dominfo", "web"]);
    assert!(err.contains("domain \"web\" not found"), "{err}");
}

#[test]
fn heavy_vmm_killed_from_outside_is_crashed_and_cleaned_up() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    d.ok(&[
        "define",
        d.definition("victim", FOREVER, "").to_str().unwrap(),
    ]);
    d.ok(&["start", "victim"]);
    let pid = d.info("victim").pid.unwrap();
    let cgroup = d.cgroup_dir("memory", "victim", "");
    assert!(cgroup.exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let info = d.wait_state("victim", "crashed", WAIT);
    assert_eq!(info.reason, "signal 9");
    assert_eq!(info.pid, None);
    assert!(!cgroup.exists(), "cgroup left behind");
    assert!(!d.run_dir().join("domains/victim").exists());
    // A crashed domain starts again.
    d.ok(&["start", "victim"]);
    assert_eq!(d.info("victim").state.to_string(), "running");
}

#[test]
fn heavy_running_domains_survive_a_daemon_restart_and_autostart_starts() {
    if !prerequisites() {
        return;
    }
    let mut d = Daemon::start();
    d.ok(&[
        "define",
        d.definition("keeps", FOREVER, "").to_str().unwrap(),
    ]);
    d.ok(&[
        "define",
        d.definition("auto", FOREVER, "").to_str().unwrap(),
    ]);
    let out = d.ok(&["autostart", "auto"]);
    assert!(out.contains("marked as autostarted"), "{out}");
    d.ok(&["start", "keeps"]);
    d.ok(&["suspend", "keeps"]);
    let pid = d.info("keeps").pid.unwrap();

    d.stop();
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok(),
        "the VMM died with the daemon"
    );
    d.launch();

    let keeps = d.info("keeps");
    assert_eq!(
        (keeps.state.to_string(), keeps.pid),
        ("paused".to_owned(), Some(pid))
    );
    let auto = d.info("auto");
    assert_eq!(auto.state.to_string(), "running", "autostart: {}", d.log());
    assert!(auto.autostart);
    // The adopted VMM is still under control, and its end is still noticed.
    d.ok(&["resume", "keeps"]);
    d.ok(&["destroy", "keeps"]);
    assert_eq!(
        d.ok(&["domstate", "keeps", "--reason"]),
        "shut off (destroyed)\n"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.info("auto").pid.unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // This daemon started it, so it sees the signal.
    assert_eq!(d.wait_state("auto", "crashed", WAIT).reason, "signal 9");
    assert!(!d.cgroup_dir("cpu", "auto", "").exists());

    d.ok(&["autostart", "auto", "--disable"]);
    d.stop();
    d.launch();
    assert_eq!(d.info("auto").state.to_string(), "shut off");
}

#[test]
fn heavy_bad_definitions_through_the_cli_change_nothing() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    let bad = d.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\nmemory = \"64m\"\nkernel = \"/nope\"\n",
    )
    .unwrap();
    let err = d.fails(&["define", bad.to_str().unwrap()]);
    assert!(err.contains("kernel") && err.contains("/nope"), "{err}");
    std::fs::write(&bad, "name = \"bad\"\n\n[resources]\ncpu_shares = \n").unwrap();
    let err = d.fails(&["define", bad.to_str().unwrap()]);
    assert!(err.contains("bad.toml: line 4"), "{err}");
    std::fs::write(
        &bad,
        "name = \"bad\"\nkernel = \"/nope\"\nmemroy = \"1g\"\n",
    )
    .unwrap();
    let err = d.fails(&["define", bad.to_str().unwrap()]);
    assert!(err.contains("line 3") && err.contains("memroy"), "{err}");
    assert_eq!(
        std::fs::read_dir(d.state_dir().join("domains"))
            .unwrap()
            .count(),
        0
    );
    let err = d.fails(&["start", "ghost"]);
    assert!(err.contains("domain \"ghost\" not found"), "{err}");

    // Hostile API requests get JSON errors with a code, and change nothing.
    let client = d.client();
    let call = |method: Method, path: &str, body: Option<serde_json::Value>| {
        block_on(client.call::<serde_json::Value>(method, path, body))
            .unwrap()
            .unwrap_err()
    };
    let code = |e: &ClientError| e.code().unwrap_or_default().to_owned();
    let e = call(
        Method::POST,
        "/v1/domains",
        Some(serde_json::json!({"config": 5})),
    );
    assert_eq!(code(&e), "bad_request", "{e}");
    let e = call(
        Method::POST,
        "/v1/domains",
        Some(serde_json::json!({"config": "", "extra": 1})),
    );
    assert_eq!(code(&e), "bad_request", "{e}");
    let e = call(Method::POST, "/v1/domains/ghost/explode", None);
    assert_eq!(code(&e), "no_such_action", "{e}");
    let e = call(Method::GET, "/v1/nothing", None);
    assert_eq!(code(&e), "no_such_route", "{e}");
    let e = call(Method::GET, "/v1/domains?all=maybe", None);
    assert_eq!(code(&e), "bad_request", "{e}");
    let e = call(Method::GET, "/v1/domains/%2e%2e/config", None);
    assert_eq!(code(&e), "not_found", "{e}");
    assert_eq!(
        std::fs::read_dir(d.state_dir().join("domains"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn heavy_vmm_that_died_while_the_daemon_was_away_is_cleaned_up() {
    if !prerequisites() {
        return;
    }
    let mut d = Daemon::start();
    d.ok(&[
        "define",
        d.definition("lost", FOREVER, "").to_str().unwrap(),
    ]);
    d.ok(&["start", "lost"]);
    let pid = d.info("lost").pid.unwrap();
    let cgroup = d.cgroup_dir("cpu", "lost", "");
    d.stop();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Not our child any more: wait until init has reaped it.
    let deadline = std::time::Instant::now() + WAIT;
    while daemon::domain::process_start_ticks(pid).is_some() {
        assert!(std::time::Instant::now() < deadline, "VMM {pid} lingers");
        std::thread::sleep(Duration::from_millis(20));
    }
    d.launch();
    assert_eq!(
        d.ok(&["domstate", "lost", "--reason"]),
        "shut off (unknown)\n"
    );
    assert!(!cgroup.exists(), "cgroup left behind");
    assert!(!d.run_dir().join("domains/lost").exists());
    d.ok(&["start", "lost"]);
}
