//! migrate --live between two "hosts": two network namespaces the test
//! creates, joined by a veth pair, each with its own oxvirtd and state
//! folder. The destination serves its remote API on its veth address; the
//! guest's memory goes from VMM to VMM over TCP through the veth. The
//! probe's `mem` workload checks its memory every pass, so a guest that
//! counts on at the destination (without booting there) arrived whole.
//! Refusals and a destination VMM that dies mid-migration leave the guest
//! running at the source. The guest then comes back to host a, whose
//! remote API is inside TLS.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::tls::{make_ca, make_server_cert};
use common::{oxvirt_bin, prerequisites, read, Daemon};
use host::net::NetNs;

const WAIT: Duration = Duration::from_secs(30);
const CHECKER: &str = "probe=mem probe.mib=8 probe.dirty_mib_s=8 probe.verify=1";
const TOKEN: &str = "token-of-host-b-0123456789";
const SOURCE_IP: &str = "10.231.0.1";
const DEST_IP: &str = "10.231.0.2";

/// Deletes the test's namespaces (after the daemons in them are gone).
struct Hosts(Vec<NetNs>);

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.0 {
            // Best effort: the namespaces are the test's own.
            let _ = ns.delete();
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces, `a` at SOURCE_IP and `b` at DEST_IP on one veth pair.
fn two_hosts() -> (Hosts, String, String) {
    let id = std::process::id();
    let (a, b) = (format!("oxr-a-{id}"), format!("oxr-b-{id}"));
    let hosts = Hosts(vec![NetNs::create(&a).unwrap(), NetNs::create(&b).unwrap()]);
    ip(&[
        "link", "add", "oxra", "netns", &a, "type", "veth", "peer", "name", "oxrb", "netns", &b,
    ]);
    for (ns, dev, addr) in [(&a, "oxra", SOURCE_IP), (&b, "oxrb", DEST_IP)] {
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    (hosts, a, b)
}

fn last_pass(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split("pass=").nth(1)?.split(' ').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn wait_pass(d: &Daemon, pass: u64) -> String {
    let log = d.state_dir().join("log/mover.log");
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if last_pass(&text) > pass {
            return text;
        }
        assert!(Instant::now() < deadline, "stuck at pass {pass}: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `oxvirt migrate --live ARGS... mover DESTURI` at the source, with the
/// token in $OXVIRT_TOKEN.
fn migrate(source: &Daemon, token: &str, desturi: &str, flags: &[&str]) -> Output {
    Command::new(oxvirt_bin())
        .args(["migrate", "--live"])
        .args(flags)
        .args(["mover", desturi])
        .env("OXVIRT_DEFAULT_CONNECT_URI", source.socket())
        .env("OXVIRT_TOKEN", token)
        .output()
        .unwrap()
}

fn refused(source: &Daemon, token: &str, desturi: &str, why: &str) {
    let out = migrate(source, token, desturi, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(why), "{err}");
    assert_eq!(source.ok(&["domstate", "mover"]), "running\n");
}

/// The pid of the process whose command line holds `needle`.
fn pid_with(needle: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmdline)
            .contains(needle)
            .then_some(pid)
    })
}

fn private_token(dir: &Path) -> PathBuf {
    let path = dir.join("b.token");
    std::fs::write(&path, TOKEN).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[test]
fn heavy_live_migration_between_two_hosts_over_tcp() {
    if !prerequisites() {
        return;
    }
    let (_hosts, a, b) = two_hosts();
    let secrets = tempfile::tempdir().unwrap();
    let token = private_token(secrets.path());
    let listen = format!("tcp:{DEST_IP}:0");
    let target = Daemon::start_with(
        &["--listen", &listen, "--token-file", token.to_str().unwrap()],
        Some(&b),
    );
    // Host a serves its remote API inside TLS, for the way back.
    make_ca(secrets.path(), "ca");
    make_server_cert(secrets.path(), SOURCE_IP);
    let cert = |name: &str| secrets.path().join(name).to_str().unwrap().to_owned();
    let source = Daemon::start_with(
        &[
            "--listen",
            &format!("tcp:{SOURCE_IP}:0"),
            "--token-file",
            token.to_str().unwrap(),
            "--tls-cert",
            &cert("server.pem"),
            "--tls-key",
            &cert("server.key"),
        ],
        Some(&a),
    );
    let addr = read(&target.run_dir().join("oxvirtd.tcp"));
    assert!(addr.starts_with(DEST_IP), "{addr}");
    let desturi = format!("oxvirt+tcp://{addr}/system");

    let file = source.definition("mover", CHECKER, "");
    source.ok(&["define", file.to_str().unwrap()]);
    source.ok(&["start", "mover"]);
    let before = last_pass(&wait_pass(&source, 1));

    // Refusals: a wrong token, nobody listening, a name the destination has.
    refused(&source, "not-the-token-of-host-b", &desturi, "wrong token");
    let nobody = format!("oxvirt+tcp://{DEST_IP}:1/system");
    refused(&source, TOKEN, &nobody, "cannot connect to oxvirtd");
    let clash = target.definition("mover", "probe=hello", "");
    target.ok(&["define", clash.to_str().unwrap()]);
    refused(&source, TOKEN, &desturi, "already exists");
    target.ok(&["undefine", "mover"]);

    // The destination's VMM dies mid-migration (held back at 1 MiB/s
    // while the guest dirties 8 MiB/s): the guest runs on at the source.
    source.ok(&["migrate-setspeed", "mover", "1"]);
    let pending = Command::new(oxvirt_bin())
        .args(["migrate", "--live", "mover", &desturi])
        .env("OXVIRT_DEFAULT_CONNECT_URI", source.socket())
        .env("OXVIRT_TOKEN", TOKEN)
        .spawn()
        .unwrap();
    let incoming_api = target.run_dir().join("domains/mover/api.sock");
    let needle = incoming_api.to_str().unwrap().to_owned();
    let deadline = Instant::now() + WAIT;
    let vmm = loop {
        if let Some(pid) = pid_with(&needle) {
            break pid;
        }
        assert!(Instant::now() < deadline, "no destination VMM");
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_secs(1));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vmm),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = pending.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert_eq!(source.ok(&["domstate", "mover"]), "running\n");
    let at = last_pass(&wait_pass(&source, before));
    wait_pass(&source, at);
    let deadline = Instant::now() + WAIT;
    while !target.ok(&["list", "--all", "--name"]).trim().is_empty() {
        assert!(Instant::now() < deadline, "host b kept the failed domain");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Now for real: the guest and its definition move to host b.
    source.ok(&["migrate-setspeed", "mover", "512"]);
    let out = migrate(
        &source,
        TOKEN,
        &desturi,
        &["--persistent", "--undefinesource"],
    );
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        target.log()
    );
    let moved_at = last_pass(&read(&source.state_dir().join("log/mover.log")));
    assert!(source.fails(&["domstate", "mover"]).contains("not found"));
    assert!(!source.state_dir().join("domains/mover.toml").exists());
    assert_eq!(
        target.ok(&["domstate", "mover", "--reason"]),
        "running (migrated in)\n"
    );
    let log = wait_pass(&target, moved_at);
    assert!(
        !log.contains("fill_mib="),
        "booted again at the destination: {log}"
    );
    assert!(log.contains("verify=ok") && !log.contains("fail"), "{log}");
    assert!(read(&target.state_dir().join("domains/mover.toml")).contains("name = \"mover\""));
    // The destination's VMM lives in host b's network namespace.
    let pid = target.info("mover").pid.unwrap();
    let inode = |path: String| std::fs::metadata(path).unwrap().ino();
    assert_eq!(
        inode(format!("/proc/{pid}/ns/net")),
        inode(format!("/run/netns/{b}"))
    );

    // And back to host a, the API call inside TLS checked against the CA.
    let back = format!(
        "oxvirt+tls://{}/system",
        read(&source.run_dir().join("oxvirtd.tcp"))
    );
    let out = Command::new(oxvirt_bin())
        .args(["migrate", "--live", "mover", &back, "--dest-ca-file"])
        .arg(cert("ca.pem"))
        .env("OXVIRT_DEFAULT_CONNECT_URI", target.socket())
        .env("OXVIRT_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        target.ok(&["domstate", "mover", "--reason"]),
        "shut off (migrated)\n"
    );
    assert_eq!(
        source.ok(&["domstate", "mover", "--reason"]),
        "running (migrated in)\n"
    );
    let back_at = last_pass(&read(&target.state_dir().join("log/mover.log")));
    let log = wait_pass(&source, back_at);
    assert_eq!(log.matches("fill_mib=").count(), 1, "booted again: {log}");
    assert!(!log.contains("fail"), "{log}");
    source.ok(&["destroy", "mover"]);
}
