//! Virtual networks through the CLI: a real oxvirtd inside a network
//! namespace of the test's own (so its bridges and NAT tables are private),
//! clients that are veth ends in further namespaces running busybox's
//! udhcpc against the daemon's DHCP server. The namespaces go when the
//! test ends, even on failure.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{oxvirt_bin, Daemon};
use host::net::{Links, NetNs};
use testkit::Namespaces;

fn prerequisites() -> bool {
    testkit::require_root()
        && testkit::require(
            oxvirt_bin().exists(),
            "the oxvirt binary is missing (cargo build --release)",
        )
        && testkit::require(
            Command::new("busybox").arg("--help").output().is_ok(),
            "busybox (udhcpc) is missing: scripts/setup.sh installs it",
        )
}

fn ip(ns: &NetNs, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", ns.name()])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A client namespace whose veth `ifname` (MAC `mac`) has its peer on
/// `bridge` in the daemon's namespace.
fn client(nss: &mut Namespaces, daemon_ns: &NetNs, bridge: &str, ifname: &str, mac: &str) -> NetNs {
    let ns = nss.add(ifname);
    let links = Links::in_netns(daemon_ns);
    let peer = format!("{ifname}p");
    links.add_veth(ifname, &peer).unwrap();
    links.set_master(&peer, bridge).unwrap();
    links.set_up(&peer).unwrap();
    links.move_to(ifname, &ns).unwrap();
    ip(&ns, &["link", "set", ifname, "address", mac, "up"]);
    ns
}

/// Runs udhcpc once; returns what its script saw on `bound`.
fn udhcpc(ns: &NetNs, ifname: &str, dir: &Path, extra: &[&str]) -> HashMap<String, String> {
    let script = dir.join("udhcpc.sh");
    let out_file = dir.join(format!("{ifname}.env"));
    let _ = std::fs::remove_file(&out_file);
    std::fs::write(
        &script,
        "#!/bin/sh\n[ \"$1\" = bound ] && env > \"$OUT_FILE\"\nexit 0\n",
    )
    .unwrap();
    let executable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&script, executable).unwrap();
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "busybox",
            "udhcpc",
            "-i",
            ifname,
        ])
        .args(["-f", "-q", "-n", "-t", "5", "-T", "1", "-s"])
        .arg(&script)
        .args(extra)
        .env("OUT_FILE", &out_file)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "udhcpc failed: {log}");
    std::fs::read_to_string(&out_file)
        .unwrap_or_else(|e| panic!("no bound event ({e}): {log}"))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

const LAB: &str = "# an isolated lab network\nname = \"lab\"\nbridge = \"oxtlab0\"\naddress = \"10.215.0.1/24\"\nforward = \"none\"\n\n[dhcp]\nstart = \"10.215.0.10\"\nend = \"10.215.0.20\"\nlease_seconds = 600\ndns = [\"192.0.2.53\"]\n\n[[dhcp.host]]\nmac = \"52:54:00:00:aa:02\"\nip = \"10.215.0.5\"\nname = \"fixed\"\n";

#[test]
fn heavy_default_network_and_a_defined_one_lease_addresses_to_udhcpc() {
    if !prerequisites() {
        return;
    }
    let mut nss = Namespaces::default();
    let dns = nss.add("daemon");
    let mut d = Daemon::start_with(
        &[
            "--network-bridge",
            "oxtnet0",
            "--network-address",
            "10.214.0.1/24",
        ],
        Some(dns.name()),
    );
    let work = d.dir.path().to_owned();

    // The default network is defined, autostarted and serving DHCP.
    let list = d.ok(&["net-list"]);
    assert!(
        list.lines().any(
            |l| l.split_whitespace().collect::<Vec<_>>() == ["default", "active", "yes", "yes"]
        ),
        "{list}"
    );
    let info = d.ok(&["net-info", "default"]);
    for want in [
        "Bridge:         oxtnet0",
        "Address:        10.214.0.1/24",
        "DHCP range:     10.214.0.2 - 10.214.0.254",
        "DHCP server:    running",
        "Forward:        nat",
    ] {
        assert!(info.contains(want), "{want} in {info}");
    }
    let c1 = client(&mut nss, &dns, "oxtnet0", "dc1", "52:54:00:00:aa:01");
    let got = udhcpc(&c1, "dc1", &work, &["-x", "hostname:guest1"]);
    let addr = got["ip"].clone();
    let last: u8 = addr.strip_prefix("10.214.0.").unwrap().parse().unwrap();
    assert!((2..=254).contains(&last), "{got:?}");
    assert_eq!(got["router"], "10.214.0.1");
    assert_eq!(got["subnet"], "255.255.255.0");
    assert_eq!(got["lease"], "3600");
    let host_dns = host::net::dhcp::host_name_servers();
    let host_dns: Vec<String> = host_dns.iter().map(|ip| ip.to_string()).collect();
    assert_eq!(
        got.get("dns").map(|d| d.trim().to_owned()),
        (!host_dns.is_empty()).then(|| host_dns.join(" ")),
        "{got:?}"
    );
    let leases = d.ok(&["net-dhcp-leases", "default"]);
    let line = leases
        .lines()
        .find(|l| l.contains("52:54:00:00:aa:01"))
        .unwrap_or_else(|| panic!("{leases}"));
    assert!(
        line.contains(&format!("{addr}/24")) && line.contains("guest1") && line.contains("ipv4"),
        "{line}"
    );

    // A network of our own, with a fixed address for one MAC.
    let lab = work.join("lab.toml");
    std::fs::write(&lab, LAB).unwrap();
    let out = d.ok(&["net-define", "--file", lab.to_str().unwrap()]);
    assert!(out.contains("Network lab defined"), "{out}");
    assert_eq!(
        d.ok(&["net-dumpxml", "lab"]),
        LAB,
        "the file as written, comment included"
    );
    assert!(d.ok(&["net-list"]).lines().all(|l| !l.contains("lab")));
    assert!(d.ok(&["net-list", "--all"]).contains(" lab "));
    d.ok(&["net-start", "lab"]);
    let c2 = client(&mut nss, &dns, "oxtlab0", "dc2", "52:54:00:00:aa:02");
    let fixed = udhcpc(&c2, "dc2", &work, &[]);
    assert_eq!(
        (
            fixed["ip"].as_str(),
            fixed["dns"].trim(),
            fixed["lease"].as_str()
        ),
        ("10.215.0.5", "192.0.2.53", "600")
    );
    assert!(fixed.get("router").is_some_and(|r| r == "10.215.0.1"));
    let table = ip(&dns, &["link", "show", "oxtlab0"]);
    assert!(table.contains("oxtlab0"), "{table}");
    let nft = Command::new("ip")
        .args(["netns", "exec", dns.name(), "nft", "list", "tables"])
        .output()
        .unwrap();
    let tables = String::from_utf8_lossy(&nft.stdout);
    assert!(
        tables.contains("oxvirt_default") && !tables.contains("oxvirt_lab"),
        "forward = none has no NAT: {tables}"
    );

    // A restarted daemon serves the active networks again with their leases.
    d.stop();
    d.launch();
    assert!(d
        .ok(&["net-info", "lab"])
        .contains("DHCP server:    running"));
    assert!(d
        .ok(&["net-dhcp-leases", "default"])
        .contains(&format!("{addr}/24")));
    let again = udhcpc(&c1, "dc1", &work, &[]);
    assert_eq!(again["ip"], addr, "the same client gets its address back");

    // virsh's spelling: net-autostart --network NET.
    let out = d.ok(&["net-autostart", "--network", "lab"]);
    assert!(out.contains("marked as autostarted"), "{out}");
    assert!(d.ok(&["net-info", "lab"]).contains("Autostart:      yes"));
    d.ok(&["net-autostart", "lab", "--disable"]);
    d.ok(&["net-destroy", "lab"]);
    assert!(ip(&dns, &["link", "show", "oxtlab0"]).contains("does not exist"));
    assert!(d.ok(&["net-info", "lab"]).contains("Active:         no"));
    d.ok(&["net-undefine", "lab"]);
    assert!(!d.ok(&["net-list", "--all"]).contains(" lab "));
    assert!(!d.state_dir().join("networks/lab.toml").exists());
}

#[test]
fn heavy_bad_network_definitions_and_verbs_are_refused() {
    if !prerequisites() {
        return;
    }
    let mut nss = Namespaces::default();
    let dns = nss.add("daemon");
    let d = Daemon::start_with(
        &[
            "--network-bridge",
            "oxtbad0",
            "--network-address",
            "10.216.0.1/24",
        ],
        Some(dns.name()),
    );
    let file = d.dir.path().join("net.toml");
    let define = |text: &str| {
        std::fs::write(&file, text).unwrap();
        d.fails(&["net-define", file.to_str().unwrap()])
    };
    let good = "name = \"other\"\nbridge = \"oxtoth0\"\naddress = \"10.217.0.1/24\"\n";
    let err = define(&format!("{good}[dhcp]\nstart = \"10.217.0.5\"\nend = 7\n"));
    assert!(err.contains("net.toml: line 6: invalid type"), "{err}");
    let err = define(&format!("{good}colour = \"red\"\n"));
    assert!(err.contains("unknown field `colour`"), "{err}");
    let err = define(&good.replace("oxtoth0", "oxtbad0"));
    assert!(
        err.contains("bridge: oxtbad0 is network \"default\"'s bridge"),
        "{err}"
    );
    let err = define(&good.replace("10.217.0.1/24", "10.216.0.9/16"));
    assert!(err.contains("overlaps network \"default\""), "{err}");
    let err = define(&format!(
        "{good}[dhcp]\nstart = \"10.217.0.50\"\nend = \"10.217.0.40\"\n"
    ));
    assert!(err.contains("comes after"), "{err}");
    let err = define(
        &good
            .replace("other", "default")
            .replace("oxtoth0", "oxtx0")
            .replace("10.217", "10.218"),
    );
    assert!(err.contains("already exists"), "{err}");
    let networks = std::fs::read_dir(d.state_dir().join("networks")).unwrap();
    let defs: Vec<_> = networks
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .collect();
    assert_eq!(defs.len(), 1, "nothing written but default");

    assert!(d
        .fails(&["net-start", "default"])
        .contains("is active: cannot start"));
    assert!(d.fails(&["net-info"]).contains("required"));
    let both = d.fails(&["net-info", "a", "--network", "b"]);
    assert!(both.contains("cannot be used with"), "{both}");
    assert!(d
        .fails(&["net-undefine", "default"])
        .contains("net-destroy it first"));
    assert!(d
        .fails(&["net-info", "nope"])
        .contains("network \"nope\" not found"));
    assert!(d.fails(&["net-dhcp-leases", "nope"]).contains("not found"));
    d.ok(&["net-destroy", "default"]);
    assert!(d
        .fails(&["net-destroy", "default"])
        .contains("is inactive: cannot destroy"));
    // A domain whose NIC's network is down is refused, naming the fix.
    let kernel = oxvirt_bin();
    let def = d.dir.path().join("nic.toml");
    let text = format!(
        "name = \"nic\"\nkernel = \"{}\"\n[[nic]]\n",
        kernel.display()
    );
    std::fs::write(&def, text).unwrap();
    d.ok(&["define", def.to_str().unwrap()]);
    let err = d.fails(&["start", "nic"]);
    assert!(err.contains("oxvirt net-start default"), "{err}");
    d.ok(&["net-start", "default"]);
}

/// Waits for `pattern` in the domain's console log; returns the log.
fn wait_console(d: &Daemon, name: &str, pattern: &str) -> String {
    let log = d.info(name).console_log;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(pattern) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {pattern:?} in {text}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The address after `key=` on the console line starting with `prefix`.
fn console_value(console: &str, prefix: &str, key: &str) -> String {
    let line = console
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {console}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        .to_owned()
}

/// Sends `data` to the probe's TCP echo server from `ns`; returns the echo
/// (none for `quit`, which ends the probe).
fn echo(ns: &NetNs, addr: &str, data: &[u8]) -> Vec<u8> {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    ns.run(|| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(data).unwrap();
        let mut back = vec![0u8; if data == b"quit" { 0 } else { data.len() }];
        s.read_exact(&mut back).unwrap();
        back
    })
    .unwrap()
}

#[test]
fn heavy_probe_guests_get_their_addresses_from_our_dhcp_server() {
    if !common::prerequisites() {
        return;
    }
    let mut nss = Namespaces::default();
    let dns = nss.add("daemon");
    let d = Daemon::start_with(
        &[
            "--network-bridge",
            "oxtvm0",
            "--network-address",
            "10.219.0.1/24",
        ],
        Some(dns.name()),
    );
    let kernel = testkit::probe_kernel_virtio();
    let define = |name: &str, nic: &str| {
        let path = d.dir.path().join(format!("{name}.toml"));
        let text = format!(
            "name = \"{name}\"\nmemory = \"64m\"\nkernel = \"{}\"\ncmdline = \"probe=net probe.ip=dhcp probe.port=7\"\n[[nic]]\n{nic}",
            kernel.display()
        );
        std::fs::write(&path, text).unwrap();
        d.ok(&["define", path.to_str().unwrap()]);
    };
    // One guest on the default network, one with a fixed address on another.
    define("dyn", "mac = \"52:54:00:00:bb:01\"\n");
    let lab = d.dir.path().join("vmlab.toml");
    std::fs::write(
        &lab,
        "name = \"vmlab\"\nbridge = \"oxtvml0\"\naddress = \"10.220.0.1/24\"\n[dhcp]\nstart = \"10.220.0.100\"\nend = \"10.220.0.110\"\n[[dhcp.host]]\nmac = \"52:54:00:00:bb:02\"\nip = \"10.220.0.7\"\nname = \"pinned\"\n",
    )
    .unwrap();
    d.ok(&["net-define", lab.to_str().unwrap()]);
    d.ok(&["net-start", "vmlab"]);
    define(
        "fixed",
        "network = \"vmlab\"\nmac = \"52:54:00:00:bb:02\"\n",
    );
    d.ok(&["start", "dyn"]);
    d.ok(&["start", "fixed"]);

    let console = wait_console(&d, "dyn", "PROBE RESULT net listening");
    let cidr = console_value(&console, "PROBE RESULT net dhcp", "ip");
    assert_eq!(
        console_value(&console, "PROBE RESULT net dhcp", "router"),
        "10.219.0.1"
    );
    let addr = cidr.strip_suffix("/24").unwrap_or_else(|| panic!("{cidr}"));
    let last: u8 = addr.strip_prefix("10.219.0.").unwrap().parse().unwrap();
    assert!((2..=254).contains(&last), "{cidr}");
    let leases = d.ok(&["net-dhcp-leases", "default", "--mac", "52:54:00:00:bb:01"]);
    assert!(
        leases.contains(&format!("52:54:00:00:bb:01   ipv4       {cidr}")),
        "{leases}"
    );
    assert_eq!(
        echo(&dns, &format!("{addr}:7"), b"leased address"),
        b"leased address"
    );
    let ifaddr = d.ok(&["domifaddr", "dyn"]);
    let line = ifaddr
        .lines()
        .find(|l| l.contains("52:54:00:00:bb:01"))
        .unwrap_or_else(|| panic!("{ifaddr}"));
    assert!(
        line.trim_start().starts_with("oxvnet") && line.ends_with(&format!("ipv4         {cidr}")),
        "{line}"
    );

    let console = wait_console(&d, "fixed", "PROBE RESULT net listening");
    assert_eq!(
        console_value(&console, "PROBE RESULT net dhcp", "ip"),
        "10.220.0.7/24"
    );
    assert!(d
        .ok(&["net-dhcp-leases", "vmlab"])
        .contains("10.220.0.7/24        pinned"));
    assert_eq!(
        echo(&dns, "10.220.0.7:7", b"fixed address"),
        b"fixed address"
    );

    for (name, addr) in [("dyn", addr), ("fixed", "10.220.0.7")] {
        echo(&dns, &format!("{addr}:7"), b"quit");
        d.wait_state(name, "shut off", Duration::from_secs(30));
    }
}
