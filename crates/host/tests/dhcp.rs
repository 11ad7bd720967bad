//! The DHCP server against a real client (busybox udhcpc), root only. The
//! server runs on a bridge in one namespace; each client is a veth end in
//! a namespace of its own. The guard deletes the namespaces (and with them
//! the bridge and veths) even when the test fails.

use std::collections::HashMap;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::Path;
use std::process::Command;

use host::net::dhcp::{opt, DhcpConfig, DhcpServer, MessageType, Packet, StaticHost, BOOTREPLY};
use host::net::{Links, NetNs};
use testkit::Namespaces;

const BRIDGE: &str = "dhbr0";

fn prerequisites() -> bool {
    testkit::require_root()
        && testkit::require(
            Command::new("busybox").arg("--help").output().is_ok(),
            "busybox (udhcpc) is missing: scripts/setup.sh installs it",
        )
}

fn ip(ns: &NetNs, args: &[&str]) {
    let out = Command::new("ip")
        .args(["-n", ns.name()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client namespace with veth `cN` (MAC `mac`) whose peer is on the bridge.
fn client(nss: &mut Namespaces, server: &NetNs, n: u32, mac: &str) -> NetNs {
    let ns = nss.add(&format!("c{n}"));
    let links = Links::in_netns(server);
    let (inner, outer) = (format!("c{n}"), format!("c{n}p"));
    links.add_veth(&inner, &outer).unwrap();
    links.set_master(&outer, BRIDGE).unwrap();
    links.set_up(&outer).unwrap();
    links.move_to(&inner, &ns).unwrap();
    ip(&ns, &["link", "set", &inner, "address", mac, "up"]);
    ns
}

/// Runs udhcpc once in `ns`; returns the variables its script saw on
/// `bound` (ip, router, dns, subnet, lease, serverid, ...).
fn udhcpc(ns: &NetNs, ifname: &str, dir: &Path, extra: &[&str]) -> HashMap<String, String> {
    let script = dir.join("script.sh");
    let out_file = dir.join(format!("{ifname}.env"));
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
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "udhcpc failed: {log}");
    std::fs::read_to_string(&out_file)
        .unwrap_or_else(|e| panic!("no bound event ({e}): {log}"))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn config(leases: &Path) -> DhcpConfig {
    DhcpConfig {
        interface: BRIDGE.into(),
        address: "10.77.0.1/24".parse().unwrap(),
        server: Ipv4Addr::new(10, 77, 0, 1),
        range: (Ipv4Addr::new(10, 77, 0, 100), Ipv4Addr::new(10, 77, 0, 150)),
        lease_time_s: 3600,
        dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
        hosts: vec![StaticHost {
            mac: [2, 0xaa, 0xbb, 0xcc, 0xdd, 2],
            ip: Ipv4Addr::new(10, 77, 0, 77),
            name: Some("fixed".into()),
        }],
        leases_file: leases.to_owned(),
    }
}

/// Garbage, truncated messages and replies sent to the server's port.
fn send_hostile_messages(ns: &NetNs) {
    ns.run(|| {
        let socket = UdpSocket::bind("10.77.0.200:0").unwrap();
        let reply = Packet {
            op: BOOTREPLY,
            xid: 1,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::new(10, 77, 0, 100),
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [2, 0, 0, 0, 0, 9],
            message_type: MessageType::Ack,
            options: vec![(opt::SERVER_ID, vec![10, 77, 0, 66])],
        }
        .encode();
        let mut overrun = reply.clone();
        overrun[0] = 1;
        overrun[241] = 250;
        for bytes in [
            &b"hello"[..],
            &[0xff; 1400],
            &reply[..239],
            &reply,
            &overrun,
        ] {
            socket.send_to(bytes, "10.77.0.1:67").unwrap();
        }
    })
    .unwrap();
}

#[test]
fn heavy_udhcpc_gets_a_lease_a_static_address_and_keeps_them_across_a_restart() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut nss = Namespaces::default();
    let server_ns = nss.add("srv");
    let links = Links::in_netns(&server_ns);
    links.add_bridge(BRIDGE).unwrap();
    links
        .add_address(BRIDGE, "10.77.0.1/24".parse().unwrap())
        .unwrap();
    links.set_up(BRIDGE).unwrap();
    let leases = dir.path().join("leases/default.leases");
    let server = DhcpServer::start(config(&leases), Some(&server_ns)).unwrap();

    let c1 = client(&mut nss, &server_ns, 1, "02:00:00:00:00:01");
    ip(&c1, &["addr", "add", "10.77.0.200/24", "dev", "c1"]);
    send_hostile_messages(&c1);
    ip(&c1, &["addr", "flush", "dev", "c1"]);

    let got = udhcpc(&c1, "c1", dir.path(), &["-x", "hostname:guest1"]);
    let address: Ipv4Addr = got["ip"].parse().unwrap();
    assert!((100..=150).contains(&address.octets()[3]), "{got:?}");
    assert_eq!(got["router"], "10.77.0.1");
    assert_eq!(got["dns"].trim(), "192.0.2.53");
    assert_eq!(got["subnet"], "255.255.255.0");
    assert_eq!(got["lease"], "3600");
    assert_eq!(got["serverid"], "10.77.0.1");

    let c2 = client(&mut nss, &server_ns, 2, "02:aa:bb:cc:dd:02");
    let fixed = udhcpc(&c2, "c2", dir.path(), &[]);
    assert_eq!(fixed["ip"], "10.77.0.77");
    assert_eq!(fixed["hostname"], "fixed");

    let held = server.leases();
    let names: Vec<_> = held.iter().map(|l| (l.ip, l.hostname.clone())).collect();
    assert_eq!(
        names,
        [
            (Ipv4Addr::new(10, 77, 0, 77), Some("fixed".into())),
            (address, Some("guest1".into()))
        ]
    );
    let file = std::fs::read_to_string(&leases).unwrap();
    assert!(
        file.contains(&format!("02:00:00:00:00:01 {address} guest1 *")),
        "{file}"
    );

    // A restarted server knows the leases and gives client 1 its address again.
    drop(server);
    let server = DhcpServer::start(config(&leases), Some(&server_ns)).unwrap();
    assert_eq!(server.leases(), held);
    let again = udhcpc(&c1, "c1", dir.path(), &[]);
    assert_eq!(again["ip"], address.to_string());
}
