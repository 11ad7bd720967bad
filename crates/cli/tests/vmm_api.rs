//! The `oxvirt vmm` control socket on real KVM: stop/cont seen in the
//! guest's progress, system_reset, query-cpus, events, quit, bad commands.

mod vmm_common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_common::{oxvirt, temp_dir};

/// A running `oxvirt vmm` with its console in a file and a connected client.
struct Session {
    child: Child,
    console: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events read while waiting for a reply, oldest first.
    events: Vec<Value>,
    dir: PathBuf,
}

impl Session {
    fn start(name: &str, cmdline: &str, vcpus: u32) -> Session {
        let dir = temp_dir(name);
        let console = dir.join("console.txt");
        let api = dir.join("api.sock");
        let kernel = testkit::probe_kernel();
        let child = oxvirt()
            .arg("vmm")
            .arg("--kernel")
            .arg(&kernel)
            .args([
                "--cmdline",
                cmdline,
                "--memory",
                "64M",
                "--vcpus",
                &vcpus.to_string(),
            ])
            .arg("--serial")
            .arg(format!("file:{}", console.display()))
            .arg("--api")
            .arg(&api)
            .stdin(Stdio::null())
            .spawn()
            .expect("start oxvirt vmm");
        let stream = connect(&api);
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let greeting = read_json(&mut reader);
        assert!(greeting.get("QMP").is_some(), "greeting {greeting}");
        Session {
            child,
            console,
            reader,
            writer: stream,
            events: Vec::new(),
            dir,
        }
    }

    fn send_raw(&mut self, line: &str) -> Value {
        self.writer.write_all(line.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        self.next_reply()
    }

    fn execute(&mut self, command: &str) -> Value {
        self.send_raw(&json!({"execute": command}).to_string())
    }

    /// The next reply line; events on the way are kept for `wait_event`.
    fn next_reply(&mut self) -> Value {
        loop {
            let v = read_json(&mut self.reader);
            if v.get("event").is_none() {
                return v;
            }
            self.events.push(v);
        }
    }

    /// Takes the event `name` (already received, or the next one to come).
    fn wait_event(&mut self, name: &str) -> Value {
        let is = |v: &Value| v.get("event").and_then(Value::as_str) == Some(name);
        if let Some(i) = self.events.iter().position(is) {
            return self.events.remove(i);
        }
        loop {
            let v = read_json(&mut self.reader);
            if is(&v) {
                return v;
            }
        }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    fn count(&self, needle: &str) -> usize {
        self.console().matches(needle).count()
    }

    /// Waits until the console holds at least `n` of `needle`.
    fn wait_count(&self, needle: &str, n: usize, timeout: Duration) {
        let start = Instant::now();
        while self.count(needle) < n {
            assert!(
                start.elapsed() < timeout,
                "waited {timeout:?} for {n} x {needle:?}; console:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_exit(mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status.code();
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = std::fs::remove_dir_all(&self.dir);
        status
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(path: &Path) -> UnixStream {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                return s;
            }
            Err(e) if start.elapsed() > Duration::from_secs(20) => panic!("connect {path:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn read_json(reader: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .expect("read from the control socket");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
}

const PASS: &str = "PROBE RESULT mem pass=";
/// About four passes a second, until stopped.
const MEM_LOOP: &str = "probe=mem probe.mib=4 probe.dirty_mib_s=16";

#[test]
fn heavy_api_stop_and_cont_freeze_the_guest() {
    if !testkit::require_kvm() {
        return;
    }
    let mut s = Session::start("vmm-api-stop", MEM_LOOP, 1);
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

#[test]
fn heavy_api_system_reset_reboots_the_guest() {
    if !testkit::require_kvm() {
        return;
    }
    let mut s = Session::start("vmm-api-reset", MEM_LOOP, 2);
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
    let mut s = Session::start("vmm-api-cpus", MEM_LOOP, 2);
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
    let mut s = Session::start("vmm-api-bad", MEM_LOOP, 1);
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
