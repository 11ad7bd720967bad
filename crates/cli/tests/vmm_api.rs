//! The `oxvirt vmm` control socket on real KVM: stop/cont seen in the
//! guest's progress, -S (start paused), system_reset, query-cpus, events,
//! quit, bad commands.

mod vmm_common;

use std::time::Duration;

use serde_json::json;
use vmm_common::{temp_dir, vmm_command, Session};

/// The probe guest (64 MiB, `vcpus`) with its console in a file.
fn probe_session(name: &str, cmdline: &str, vcpus: u32) -> Session {
    let vcpus = vcpus.to_string();
    Session::start(
        name,
        &testkit::probe_kernel(),
        &["--cmdline", cmdline, "--memory", "64M", "--vcpus", &vcpus],
    )
}

const PASS: &str = "PROBE RESULT mem pass=";
/// About four passes a second, until stopped.
const MEM_LOOP: &str = "probe=mem probe.mib=4 probe.dirty_mib_s=16";

#[test]
fn heavy_api_stop_and_cont_freeze_the_guest() {
    if !testkit::require_kvm() {
        return;
    }
    let mut s = probe_session("vmm-api-stop", MEM_LOOP, 1);
    s.wait_count(PASS, 2, Duration::from_secs(30));
    assert_eq!(s.execute("query-status")["return"]["status"], "running");
    assert_eq!(s.execute("stop"), json!({"return": {}}));
    s.wait_event("STOP");
    assert_eq!(s.execute("query-status")["return"]["status"], "paused");
    let frozen = s.count(PASS);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(s.count(PASS), frozen, "the guest ran while stopped");
    assert_eq!(s.execute("cont"), json!({"return": {}}));
    s.wait_event("RESUME");
    s.wait_count(PASS, frozen + 2, Duration::from_secs(30));
    assert_eq!(s.execute("quit"), json!({"return": {}}));
    let shutdown = s.wait_event("SHUTDOWN");
    assert_eq!(shutdown["data"]["reason"], "host-qmp-quit");
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));
}

/// The status `query-status` reports, checked against its `running` field.
fn status(s: &mut Session) -> String {
    let reply = s.ok("query-status", json!({}));
    let status = reply["status"].as_str().expect("status").to_owned();
    assert_eq!(reply["running"], status == "running", "{reply}");
    status
}

/// The console stays as it is for a while: no vCPU runs.
fn assert_frozen(s: &Session, what: &str) {
    let before = s.console();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(s.console(), before, "the guest ran {what}");
}

#[test]
fn heavy_api_paused_start_runs_nothing_until_cont() {
    if !testkit::require_kvm() {
        return;
    }
    let kernel = testkit::probe_kernel();
    let args = [
        "-S",
        "--cmdline",
        MEM_LOOP,
        "--memory",
        "64M",
        "--vcpus",
        "2",
    ];
    let mut s = Session::start("vmm-api-paused", &kernel, &args);
    assert_eq!(status(&mut s), "paused");
    assert_frozen(&s, "before cont");
    assert_eq!(s.console(), "", "not even the first line before cont");
    // The vCPU threads exist already (the manager places them before cont).
    assert_eq!(
        s.ok("query-cpus", json!({})).as_array().map(Vec::len),
        Some(2)
    );
    // A stop while never started changes nothing.
    assert_eq!(s.execute("stop"), json!({"return": {}}));
    assert_eq!(status(&mut s), "paused");
    assert_eq!(s.execute("cont"), json!({"return": {}}));
    s.wait_event("RESUME");
    assert_eq!(status(&mut s), "running");
    s.wait_count("PROBE READY", 1, Duration::from_secs(30));
    s.wait_count(PASS, 2, Duration::from_secs(30));
    s.execute("quit");
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn heavy_api_restored_guest_stays_paused_until_cont() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = temp_dir("vmm-api-restore-paused");
    let saved = dir.join("vm.state");
    let uri = format!("file:{}", saved.display());
    let kernel = testkit::probe_kernel();
    let vm = ["--cmdline", MEM_LOOP, "--memory", "64M"];
    let mut src = Session::start("vmm-api-restore-src", &kernel, &vm);
    src.wait_count(PASS, 2, Duration::from_secs(30));
    src.ok("migrate", json!({"uri": uri}));
    loop {
        let info = src.ok("query-migrate", json!({}));
        match info["status"].as_str() {
            Some("completed") => break,
            Some("failed" | "cancelled") => panic!("saving the guest: {info}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    src.execute("quit");
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));

    let restore = [&vm[..], &["--incoming", uri.as_str(), "--paused"]].concat();
    let mut dst = Session::spawn("vmm-api-restore-dst", vmm_command(&kernel, &restore));
    // The reply comes once the state is loaded.
    assert_eq!(status(&mut dst), "paused");
    assert_frozen(&dst, "after the restore, before cont");
    assert_eq!(dst.count(PASS), 0);
    assert_eq!(dst.execute("cont"), json!({"return": {}}));
    assert_eq!(status(&mut dst), "running");
    // It carries on: no new boot, passes go on from where they were.
    dst.wait_count(PASS, 2, Duration::from_secs(30));
    assert_eq!(dst.count("PROBE READY"), 0, "{}", dst.console());
    dst.execute("quit");
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn heavy_api_system_reset_reboots_the_guest() {
    if !testkit::require_kvm() {
        return;
    }
    let mut s = probe_session("vmm-api-reset", MEM_LOOP, 2);
    s.wait_count(PASS, 2, Duration::from_secs(30));
    assert_eq!(s.execute("system_reset"), json!({"return": {}}));
    let reset = s.wait_event("RESET");
    assert_eq!(reset["data"]["guest"], false);
    // The guest starts over: a second READY and passes counted from 1 again.
    s.wait_count("PROBE READY", 2, Duration::from_secs(30));
    s.wait_count(&format!("{PASS}1 "), 2, Duration::from_secs(30));
    // A reset while paused stays paused.
    s.execute("stop");
    assert_eq!(s.execute("system_reset"), json!({"return": {}}));
    assert_eq!(s.execute("query-status")["return"]["status"], "paused");
    s.execute("quit");
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn heavy_api_query_cpus_gives_vcpu_thread_ids() {
    if !testkit::require_kvm() {
        return;
    }
    let mut s = probe_session("vmm-api-cpus", MEM_LOOP, 2);
    let pid = s.child.id();
    let cpus = s.execute("query-cpus")["return"].clone();
    let cpus = cpus.as_array().expect("a list of vCPUs");
    assert_eq!(cpus.len(), 2);
    for (i, cpu) in cpus.iter().enumerate() {
        assert_eq!(cpu["cpu-index"], i);
        let tid = cpu["thread-id"].as_i64().expect("thread-id");
        let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap();
        assert_eq!(comm.trim(), format!("vcpu{i}"));
    }
    s.execute("quit");
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn heavy_api_bad_commands_get_errors_and_the_session_goes_on() {
    if !testkit::require_kvm() {
        return;
    }
    let mut s = probe_session("vmm-api-bad", MEM_LOOP, 1);
    let e = s.send_raw("{not json");
    assert_eq!(e["error"]["class"], "GenericError", "{e}");
    let e = s.send_raw(r#"{"exec": "stop"}"#);
    assert!(
        e["error"]["desc"].as_str().unwrap().contains("execute"),
        "{e}"
    );
    let e = s.send_raw(r#"{"execute": "self-destruct", "id": 7}"#);
    assert_eq!(e["error"]["class"], "CommandNotFound", "{e}");
    assert_eq!(e["id"], 7);
    let e = s.send_raw("[1, 2, 3]");
    assert!(e.get("error").is_some(), "{e}");
    assert_eq!(s.execute("qmp_capabilities"), json!({"return": {}}));
    assert_eq!(s.execute("query-status")["return"]["running"], true);
    s.execute("quit");
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn heavy_api_bad_device_and_migration_arguments_get_errors() {
    if !testkit::require_kvm() {
        return;
    }
    let mut s = probe_session("vmm-api-bad-args", MEM_LOOP, 1);
    for (command, arguments, class, says) in [
        (
            "block_set_io_throttle",
            json!({"bps": 1}),
            "GenericError",
            "'device'",
        ),
        (
            "block_set_io_throttle",
            json!({"device": "disk9"}),
            "DeviceNotFound",
            "disk9",
        ),
        (
            "net_set_throttle",
            json!({"device": "net0", "bps": "fast"}),
            "DeviceNotFound",
            "net0",
        ),
        ("set_link", json!({"name": "net0"}), "GenericError", "'up'"),
        ("migrate", json!({}), "GenericError", "'uri'"),
        (
            "migrate",
            json!({"uri": "ftp:host"}),
            "GenericError",
            "unknown scheme",
        ),
        (
            "migrate",
            json!({"uri": "tcp:host"}),
            "GenericError",
            "tcp:HOST:PORT",
        ),
        (
            "migrate-set-parameters",
            json!({"downtime-limit": -1}),
            "GenericError",
            "downtime-limit",
        ),
        (
            "migrate-set-parameters",
            json!({"max-cpu-throttle": 100}),
            "GenericError",
            "1 to 99",
        ),
        (
            "migrate-set-parameters",
            json!({"speed": 1}),
            "GenericError",
            "speed",
        ),
        (
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "warp", "state": true}]}),
            "GenericError",
            "warp",
        ),
        (
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "xbzrle"}]}),
            "GenericError",
            "state",
        ),
    ] {
        let reply = s.execute_with(command, arguments.clone());
        assert_eq!(
            reply["error"]["class"], class,
            "{command} {arguments}: {reply}"
        );
        let desc = reply["error"]["desc"].as_str().unwrap_or_default();
        assert!(desc.contains(says), "{command} {arguments}: {reply}");
    }
    let e = s.send_raw(r#"{"execute": "query-block", "arguments": [1]}"#);
    assert!(
        e["error"]["desc"].as_str().unwrap().contains("arguments"),
        "{e}"
    );
    // Nothing was changed by the refused requests, and the guest runs on.
    let params = s.ok("query-migrate-parameters", json!({}));
    assert_eq!(
        (
            params["downtime-limit"].as_u64(),
            params["max-cpu-throttle"].as_u64()
        ),
        (Some(300), Some(99))
    );
    assert_eq!(s.ok("query-migrate", json!({})), json!({}));
    assert_eq!(s.ok("query-block", json!({})), json!([]));
    let passes = s.count(PASS);
    s.wait_count(PASS, passes + 1, Duration::from_secs(10));
    s.execute("quit");
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));
}
