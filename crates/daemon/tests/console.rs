//! `oxvirt console` through the daemon's relay of the VMM's serial socket,
//! and a VMM that is inside its cgroups from its first instruction.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{oxvirt_bin, prerequisites, read, Daemon};

/// A guest that prints a line every two seconds until stopped.
const CHATTY: &str = "probe=mem probe.mib=8 probe.dirty_mib_s=4";
const WAIT: Duration = Duration::from_secs(15);

/// `oxvirt console DOM` with pipes for stdin, stdout and stderr, and a
/// thread collecting stdout.
struct Session {
    child: Child,
    output: mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl Session {
    fn open(d: &Daemon, domain: &str) -> Session {
        let mut child = Command::new(oxvirt_bin())
            .args(["console", domain])
            .env("OXVIRT_DEFAULT_CONNECT_URI", d.socket())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Session {
            child,
            output,
            seen: Vec::new(),
        }
    }

    /// Waits until the output holds `text` (counting from `from` bytes).
    fn expect(&mut self, text: &str, from: usize) {
        let deadline = Instant::now() + WAIT;
        while !String::from_utf8_lossy(&self.seen[from.min(self.seen.len())..]).contains(text) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.seen.extend(chunk),
                Err(_) => panic!(
                    "no {text:?} on the console; got {:?}",
                    String::from_utf8_lossy(&self.seen)
                ),
            }
        }
    }

    fn type_keys(&mut self, keys: &[u8]) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(keys).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the CLI to exit; returns its stderr.
    fn finish(mut self) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                self.child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                assert!(status.success(), "console exit {status}: {err}");
                return err;
            }
            assert!(Instant::now() < deadline, "console did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn heavy_console_shows_the_guest_and_ctrl_bracket_detaches() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    let file = d.definition("chat", CHATTY, "");
    d.ok(&["define", file.to_str().unwrap()]);
    let err = d.fails(&["console", "chat"]);
    assert!(err.contains("shut off: cannot attach a console"), "{err}");
    d.ok(&["start", "chat"]);

    let mut first = Session::open(&d, "chat");
    first.expect("PROBE RESULT mem pass=", 0);
    // One session at a time, as in virsh.
    let err = d.fails(&["console", "chat"]);
    assert!(err.contains("already attached"), "{err}");
    // Keystrokes before Ctrl-] go to the guest; the session then ends
    // and the domain keeps running.
    first.type_keys(b"hello\x1d");
    let err = first.finish();
    assert!(err.contains("Detached from domain 'chat'"), "{err}");
    assert_eq!(d.ok(&["domstate", "chat"]), "running\n");

    // The log went on being written during the session.
    let log = d.state_dir().join("log/chat.log");
    let logged = read(&log);
    assert!(logged.contains("PROBE RESULT mem fill_mib=8"), "{logged}");

    // A second session sees new output, and ends when the domain does.
    let mut second = Session::open(&d, "chat");
    let passes = read(&log).matches("pass=").count();
    second.expect(&format!("pass={}", passes + 1), 0);
    d.ok(&["destroy", "chat"]);
    let err = second.finish();
    assert!(err.contains("console of domain 'chat' closed"), "{err}");
}

#[test]
fn heavy_vmm_runs_in_its_cgroups_from_exec_on() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A VMM binary that records where it runs before it becomes the VMM:
    // what the daemon's child side did between fork and exec.
    let seen = dir.path().join("at-exec.txt");
    let wrapper = dir.path().join("vmm-wrapper.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncat /proc/self/cgroup > {}\nexec {} \"$@\"\n",
            seen.display(),
            oxvirt_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start_with(&["--vmm-binary", wrapper.to_str().unwrap()], None);
    let file = d.definition("early", CHATTY, "[resources]\ncpu_shares = 512\n");
    d.ok(&["define", file.to_str().unwrap()]);
    d.ok(&["start", "early"]);
    let at_exec = read(&seen);
    let domain = format!("{}/early", d.cgroup_parent);
    for controller in ["cpu", "memory", "pids", "cpuset"] {
        let line = at_exec
            .lines()
            .find(|l| {
                l.split(':')
                    .nth(1)
                    .unwrap()
                    .split(',')
                    .any(|c| c == controller)
            })
            .unwrap_or_else(|| panic!("no {controller} line in {at_exec}"));
        assert!(line.contains(&domain), "{controller} at exec: {line}");
    }
    // cpu and cpuset have per-thread children: the VMM starts in emulator.
    let cpu = at_exec
        .lines()
        .find(|l| l.contains(":cpu,") || l.contains(",cpu:") || l.contains(":cpu:"))
        .unwrap();
    assert!(cpu.ends_with(&format!("{domain}/emulator")), "{cpu}");
    let unified = at_exec.lines().find(|l| l.starts_with("0::")).unwrap();
    assert!(
        unified.ends_with(&format!("{domain}/emulator")),
        "{unified}"
    );
    d.ok(&["destroy", "early"]);
}
