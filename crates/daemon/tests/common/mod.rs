//! A real oxvirtd (the `oxvirt` binary's `daemon` subcommand) in a temporary
//! state folder and its own cgroup parent, driven through the `oxvirt` CLI
//! and the API client; every domain is destroyed and every cgroup removed
//! when the test ends, even on failure.

#![allow(dead_code)]

pub mod tls;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use daemon::client::{block_on, Client};
use daemon::manager::DomainInfo;

/// The `oxvirt` binary: `$OXVIRT_BIN`, else the release build
/// (scripts/test.sh builds it before the tests), else the debug build.
pub fn oxvirt_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("OXVIRT_BIN") {
        return PathBuf::from(path);
    }
    let release = testkit::target_dir().join("release/oxvirt");
    if release.exists() {
        return release;
    }
    testkit::target_dir().join("debug/oxvirt")
}

/// KVM, root (cgroups), the oxvirt binary and the probe guest are there.
pub fn prerequisites() -> bool {
    testkit::require_kvm()
        && testkit::require_root()
        && testkit::require(
            oxvirt_bin().exists(),
            "the oxvirt binary is missing (cargo build --release)",
        )
        && testkit::require(
            testkit::probe_binary().exists(),
            "the probe guest is missing (cargo build --release)",
        )
}

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub cgroup_parent: String,
    child: Option<Child>,
    /// Extra `oxvirt daemon` arguments.
    extra: Vec<String>,
    /// The network namespace the daemon (and so its VMMs and taps) runs in.
    netns: Option<String>,
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with(&[], None)
    }

    /// A daemon with extra arguments, optionally inside network namespace
    /// `netns` (which the caller created).
    pub fn start_with(extra: &[&str], netns: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cgroup_parent = format!(
            "oxvirt-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut daemon = Daemon {
            dir,
            cgroup_parent,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: netns.map(str::to_owned),
        };
        daemon.launch();
        daemon
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir().join("oxvirtd.sock")
    }

    pub fn client(&self) -> Client {
        Client::new(self.socket())
    }

    /// Starts the daemon process and waits for its socket.
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let mut command = match &self.netns {
            // nsenter changes only the network namespace (`ip netns exec`
            // would also remount /sys and hide the cgroup mounts).
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{ns}")).arg(oxvirt_bin());
                c
            }
            None => Command::new(oxvirt_bin()),
        };
        let child = command
            .args(["daemon", "--state-dir"])
            .arg(self.state_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            .args(["--cgroup-parent", &self.cgroup_parent])
            // A daemon in the test's own namespace may make bridges there;
            // in the host's it must not leave a default network behind.
            .args(self.netns.is_none().then_some("--no-default-network"))
            .args(&self.extra)
            .env("OXVIRT_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while block_on(self.client().version()).unwrap().is_err() {
            assert!(
                Instant::now() < deadline,
                "oxvirtd did not come up: {}",
                self.log()
            );
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("oxvirtd exited ({status}): {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, as systemd stops it; waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            let status = child.wait().unwrap();
            assert!(status.success(), "oxvirtd exit: {status}: {}", self.log());
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Runs an `oxvirt` verb against this daemon.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(oxvirt_bin())
            .args(args)
            .env("OXVIRT_DEFAULT_CONNECT_URI", self.socket())
            .output()
            .unwrap()
    }

    /// Runs a verb that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "oxvirt {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a verb that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "oxvirt {args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn info(&self, name: &str) -> DomainInfo {
        block_on(self.client().info(name)).unwrap().unwrap()
    }

    /// Waits until `name` is in `state` (as `domstate` prints it).
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> DomainInfo {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.info(name);
            if info.state.to_string() == state {
                return info;
            }
            assert!(
                Instant::now() < deadline,
                "{name} still {} ({}), wanted {state}\n{}",
                info.state,
                info.reason,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A definition file for the probe guest running `cmdline`.
    pub fn definition(&self, name: &str, cmdline: &str, extra: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.toml"));
        let text = format!(
            "name = \"{name}\"\nmemory = \"64m\"\nkernel = \"{}\"\ncmdline = \"{cmdline}\"\n{extra}",
            testkit::probe_binary().display()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The cgroup v1 folder of the domain (scope "" for the domain itself,
    /// or "emulator", "vcpu0") in the `controller` hierarchy.
    pub fn cgroup_dir(&self, controller: &str, domain: &str, scope: &str) -> PathBuf {
        let own = own_cgroup(controller);
        Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(own.trim_start_matches('/'))
            .join(&self.cgroup_parent)
            .join(domain)
            .join(scope)
    }
}

/// This process's cgroup path in a v1 hierarchy (the daemon, our child,
/// places its parent below it).
fn own_cgroup(controller: &str) -> String {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let v2 = controller == "unified" && controllers.is_empty();
            (v2 || controllers.split(',').any(|c| c == controller)).then(|| path.to_owned())
        })
        .next()
        .unwrap_or_default()
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// The cgroup paths (all hierarchies) of a thread, from /proc.
pub fn thread_cgroups(pid: u32, tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup")).unwrap_or_default()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_none() {
            self.launch();
        }
        if let Ok(Ok(domains)) = block_on(self.client().list(true)) {
            for d in domains.iter().filter(|d| d.pid.is_some()) {
                // Best effort: the test may have stopped it already.
                let _ = block_on(self.client().action(&d.name, "destroy"));
            }
        }
        self.stop();
        for controller in [
            "cpu", "cpuacct", "cpuset", "memory", "pids", "blkio", "unified",
        ] {
            let own = own_cgroup(controller);
            let dir = Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(own.trim_start_matches('/'))
                .join(&self.cgroup_parent);
            // Only empty folders go; a leftover means a bug the test reports elsewhere.
            let _ = std::fs::remove_dir(dir);
        }
    }
}
