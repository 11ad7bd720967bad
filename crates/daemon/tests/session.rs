//! Session mode (`qemu:///session`'s counterpart): oxvirtd run by a normal
//! user keeps its definitions under $XDG_STATE_HOME/oxvirt and its socket
//! under $XDG_RUNTIME_DIR/oxvirt, runs its domains as that user without
//! cgroups or a default network, and `--connect oxvirt:///session` reaches it.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const USER: &str = "oxvirt-session-test";

/// Runs a set-up tool that must succeed; returns its stdout.
fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The test user (made once, a system user with no home or login).
fn test_user() -> (u32, u32) {
    let exists = Command::new("id")
        .arg(USER)
        .output()
        .unwrap()
        .status
        .success();
    if !exists {
        tool(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ],
        );
    }
    let uid = tool("id", &["-u", USER]).parse().unwrap();
    let gid = tool("id", &["-g", USER]).parse().unwrap();
    (uid, gid)
}

/// Read-write access to /dev/kvm for the test user, taken back on drop.
struct KvmAccess;

impl KvmAccess {
    fn grant() -> Self {
        tool("setfacl", &["-m", &format!("u:{USER}:rw"), "/dev/kvm"]);
        KvmAccess
    }
}

impl Drop for KvmAccess {
    fn drop(&mut self) {
        let _ = Command::new("setfacl")
            .args(["-x", &format!("u:{USER}"), "/dev/kvm"])
            .status();
    }
}

/// The user's environment: HOME, XDG_STATE_HOME and XDG_RUNTIME_DIR under
/// one folder it owns.
struct Session {
    home: tempfile::TempDir,
    uid: u32,
    gid: u32,
}

impl Session {
    fn new(uid: u32, gid: u32) -> Self {
        let home = tempfile::tempdir().unwrap();
        for dir in [home.path().to_path_buf(), home.path().join("run")] {
            std::fs::create_dir_all(&dir).unwrap();
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        Session { home, uid, gid }
    }

    fn state_dir(&self) -> PathBuf {
        self.home.path().join("state/oxvirt")
    }

    fn socket(&self) -> PathBuf {
        self.home.path().join("run/oxvirt/oxvirtd.sock")
    }

    /// `oxvirt ARGS` as the user, in its environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .args(["--clear-groups", "--"])
            .arg(common::oxvirt_bin())
            .args(args)
            .env("HOME", self.home.path())
            .env("XDG_STATE_HOME", self.home.path().join("state"))
            .env("XDG_RUNTIME_DIR", self.home.path().join("run"))
            .env_remove("OXVIRT_STATE_DIR")
            .env_remove("OXVIRT_RUN_DIR")
            .env_remove("OXVIRT_DEFAULT_CONNECT_URI");
        c
    }

    fn cli(&self, args: &[&str]) -> Output {
        let mut full = args.to_vec();
        full.extend(["--connect", "oxvirt:///session"]);
        self.command(&full).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "oxvirt {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("daemon.log")).unwrap_or_default()
    }

    /// Starts the user's daemon and waits until `list` answers.
    fn daemon(&self) -> Child {
        let log = std::fs::File::create(self.home.path().join("daemon.log")).unwrap();
        let mut child = self
            .command(&["daemon"])
            .env("OXVIRT_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        // virsh's habit: the URI before the verb.
        let list = ["--connect", "oxvirt:///session", "list", "--all"];
        while !self.command(&list).output().unwrap().status.success() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("session oxvirtd exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no session oxvirtd: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    fn state(&self, name: &str) -> String {
        self.ok(&["domstate", name]).trim().to_owned()
    }
}

fn owner(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .uid()
}

/// The real uid of process `pid`.
fn process_uid(pid: &str) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn heavy_session_daemon_of_a_normal_user_runs_its_domains_as_that_user() {
    let tools = ["setpriv", "setfacl", "useradd"].iter().all(|t| {
        testkit::require(
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            &format!("{t} is not installed (scripts/apt-packages.txt)"),
        )
    });
    if !common::prerequisites() || !tools {
        return;
    }
    let (uid, gid) = test_user();
    let _kvm = KvmAccess::grant();
    let session = Session::new(uid, gid);
    let mut daemon = session.daemon();

    assert_eq!(owner(&session.socket()), uid, "socket owner");
    assert!(
        session
            .ok(&["net-list", "--all"])
            .lines()
            .all(|l| !l.contains("default")),
        "a session daemon defines no default network"
    );

    let definition = session.home.path().join("guest.toml");
    std::fs::write(
        &definition,
        format!(
            "name = \"guest\"\nmemory = \"64m\"\nkernel = \"{}\"\ncmdline = \"probe=mem probe.mib=8 probe.dirty_mib_s=4\"\n",
            testkit::probe_binary().display()
        ),
    )
    .unwrap();
    std::os::unix::fs::chown(&definition, Some(uid), Some(gid)).unwrap();
    session.ok(&["define", definition.to_str().unwrap()]);
    let stored = session.state_dir().join("domains/guest.toml");
    assert_eq!(owner(&stored), uid, "definition owner");

    session.ok(&["start", "guest"]);
    assert_eq!(session.state("guest"), "running");
    let info = session.ok(&["dominfo", "guest"]);
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("Id:"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no Id in dominfo:\n{info}"));
    assert_eq!(process_uid(pid), uid, "the VMM runs as the user");

    session.ok(&["destroy", "guest"]);
    assert_eq!(session.state("guest"), "shut off");
    session.ok(&["undefine", "guest"]);
    assert!(!stored.exists(), "undefine removed {}", stored.display());

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = daemon.wait().unwrap();
    assert!(
        status.success(),
        "session oxvirtd exit {status}: {}",
        session.log()
    );
}
