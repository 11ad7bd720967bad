//! Real taps, bridges, veths and NAT (root only). Everything is made inside
//! network namespaces the test creates; the guard deletes them (and with
//! them every interface and nftables table inside) even when a test fails.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use host::net::{Links, Nat, NatConfig, NatNetwork, NetError, NetNs, Tap, TapConfig};
use testkit::Namespaces;

fn up_with_address(links: &Links, name: &str, cidr: &str) {
    links.add_address(name, cidr.parse().unwrap()).unwrap();
    links.set_up(name).unwrap();
}

fn listen(ns: &NetNs, ip: &str) -> TcpListener {
    let addr = format!("{ip}:0");
    ns.run(|| TcpListener::bind(&addr)).unwrap().expect("bind")
}

/// Connects from `ns` to `to`, sends a byte, and returns the peer address
/// the listener saw.
fn connect_and_see_source(ns: &NetNs, listener: &TcpListener) -> Result<SocketAddr, String> {
    let to = listener.local_addr().unwrap();
    let mut stream = ns
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(2)))
        .unwrap()
        .map_err(|e| e.to_string())?;
    stream.write_all(b"x").unwrap();
    let (mut conn, peer) = listener.accept().unwrap();
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte).unwrap();
    Ok(peer)
}

#[test]
fn tap_in_a_namespace_answers_arp_through_its_file() {
    let Some(mut spaces) = testkit::require_root().then(Namespaces::default) else {
        return;
    };
    let ns = spaces.add("tap");
    let links = Links::in_netns(&ns);
    let tap = Tap::create(&TapConfig {
        netns: Some(&ns),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(tap.name(), "oxtap0", "the kernel fills in %d");
    let info = links
        .info(tap.name())
        .unwrap()
        .expect("tap exists in the namespace");
    assert_eq!(info.kind.as_deref(), Some("tun"));
    assert_eq!((info.vnet_hdr, info.persistent), (Some(true), Some(false)));
    assert!(
        Links::host().info(tap.name()).unwrap().is_none(),
        "nothing in the host's namespace"
    );
    up_with_address(&links, tap.name(), "10.77.0.1/24");

    let frame = arp_request([2, 0, 0, 0, 0, 2], [10, 77, 0, 2], [10, 77, 0, 1]);
    let mut packet = vec![0u8; host::net::VNET_HDR_LEN];
    packet.extend_from_slice(&frame);
    let mut file = tap.file();
    file.write_all(&packet).unwrap();
    let reply = read_frame_until(&tap, Duration::from_secs(3), |f| {
        f.len() >= 42 && f[12..14] == [8, 6] && f[21] == 2
    })
    .expect("an ARP reply from the namespace's stack");
    assert_eq!(&reply[0..6], &[2, 0, 0, 0, 0, 2], "addressed to the asker");
    assert_eq!(&reply[28..32], &[10, 77, 0, 1], "10.77.0.1 answers");

    let name = tap.name().to_owned();
    drop(tap);
    assert!(
        links.info(&name).unwrap().is_none(),
        "a transient tap goes with its file"
    );
}

fn arp_request(mac: [u8; 6], from: [u8; 4], to: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&from);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&to);
    f.resize(60, 0);
    f
}

/// Reads frames (after the virtio-net header) until one matches.
fn read_frame_until(tap: &Tap, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    tap.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    let hdr = host::net::VNET_HDR_LEN;
    while Instant::now() < deadline {
        let mut file = tap.file();
        match file.read(&mut buf) {
            Ok(n) if n > hdr && want(&buf[hdr..n]) => return Some(buf[hdr..n].to_vec()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("reading the tap: {e}"),
        }
    }
    None
}

#[test]
fn persistent_tap_outlives_its_file_and_keeps_its_owner() {
    let Some(mut spaces) = testkit::require_root().then(Namespaces::default) else {
        return;
    };
    let ns = spaces.add("ptap");
    let links = Links::in_netns(&ns);
    let config = TapConfig {
        name: "vm1-net0",
        persistent: true,
        owner: Some(1000),
        netns: Some(&ns),
        ..Default::default()
    };
    let tap = Tap::create(&config).unwrap();
    drop(tap);
    let info = links
        .info("vm1-net0")
        .unwrap()
        .expect("a persistent tap stays");
    assert_eq!((info.persistent, info.owner), (Some(true), Some(1000)));
    // Opening it again attaches to the same interface.
    let again = Tap::create(&config).unwrap();
    again.set_transient().unwrap();
    drop(again);
    assert!(links.info("vm1-net0").unwrap().is_none());
}

#[test]
fn bridge_and_veth_connect_two_namespaces() {
    let Some(mut spaces) = testkit::require_root().then(Namespaces::default) else {
        return;
    };
    let (a, b) = (spaces.add("a"), spaces.add("b"));
    let (la, lb) = (Links::in_netns(&a), Links::in_netns(&b));
    la.add_bridge("br0").unwrap();
    la.add_veth("va", "vb").unwrap();
    la.set_master("va", "br0").unwrap();
    la.move_to("vb", &b).unwrap();
    assert!(la.info("vb").unwrap().is_none(), "moved out of a");
    la.set_up("va").unwrap();
    up_with_address(&la, "br0", "10.78.0.1/24");
    up_with_address(&lb, "vb", "10.78.0.2/24");

    let va = la.info("va").unwrap().unwrap();
    assert_eq!(
        (va.kind.as_deref(), va.master.as_deref(), va.up),
        (Some("veth"), Some("br0"), true)
    );
    let br = la.info("br0").unwrap().unwrap();
    assert_eq!(br.addresses, vec!["10.78.0.1/24".parse().unwrap()]);
    assert!(lb.names().unwrap().contains(&"vb".to_owned()));

    let listener = listen(&a, "10.78.0.1");
    let peer = connect_and_see_source(&b, &listener).expect("b reaches a over the bridge");
    assert_eq!(peer.ip().to_string(), "10.78.0.2");

    la.set_down("va").unwrap();
    assert!(!la.info("va").unwrap().unwrap().up);
    la.remove_master("va").unwrap();
    assert_eq!(la.info("va").unwrap().unwrap().master, None);
    la.delete("br0").unwrap();
    assert!(la.info("br0").unwrap().is_none());
}

/// guest (192.168.100.10) -- br0 [router: NAT] uplink (10.200.0.2) -- outside (10.200.0.1)
#[test]
fn heavy_nat_network_masquerades_guest_traffic_until_removed() {
    let Some(mut spaces) = testkit::require_root().then(Namespaces::default) else {
        return;
    };
    if !testkit::require(
        std::process::Command::new("nft")
            .arg("--version")
            .output()
            .is_ok(),
        "nft is not installed",
    ) {
        return;
    }
    let (guest, router, outside) = (spaces.add("guest"), spaces.add("router"), spaces.add("out"));
    let (lg, lr, lo) = (
        Links::in_netns(&guest),
        Links::in_netns(&router),
        Links::in_netns(&outside),
    );
    let config = NatConfig {
        name: "default".into(),
        address: "192.168.100.1/24".parse().unwrap(),
        bridge: "br0".into(),
        outgoing: Some("uplink".into()),
    };
    lr.add_veth("uplink", "eth0").unwrap();
    lr.move_to("eth0", &outside).unwrap();
    up_with_address(&lr, "uplink", "10.200.0.2/24");
    up_with_address(&lo, "eth0", "10.200.0.1/24");
    // The outside can route back to the guests, so only NAT hides them.
    lo.add_route(
        Some("192.168.100.0/24".parse().unwrap()),
        Ipv4Addr::new(10, 200, 0, 2),
    )
    .unwrap();
    let network = NatNetwork::start(&config, Some(&router)).unwrap();
    let br = lr.info("br0").unwrap().expect("the network's bridge");
    assert_eq!((br.up, br.addresses.clone()), (true, vec![config.address]));
    lr.add_veth("tap-g", "eth0").unwrap();
    lr.move_to("eth0", &guest).unwrap();
    lr.set_master("tap-g", network.bridge()).unwrap();
    lr.set_up("tap-g").unwrap();
    up_with_address(&lg, "eth0", "192.168.100.10/24");
    lg.add_route(None, Ipv4Addr::new(192, 168, 100, 1)).unwrap();

    let listener = listen(&outside, "10.200.0.1");
    let seen = connect_and_see_source(&guest, &listener).expect("NATed connection");
    assert_eq!(
        seen.ip().to_string(),
        "10.200.0.2",
        "masqueraded to the router's uplink address"
    );
    let nat = network.nat();
    assert_eq!(nat.table(), "oxvirt_default");
    // Applying again replaces the table instead of doubling the rules.
    Nat::apply(&config, Some(&router)).unwrap();
    assert_eq!(nat.ruleset().unwrap().matches("masquerade").count(), 1);

    // New connections from outside into the guests' bridge are dropped.
    let guest_listener = listen(&guest, "192.168.100.10");
    assert!(connect_and_see_source(&outside, &guest_listener).is_err());

    // Without the table the guest's own address shows.
    nat.remove().unwrap();
    assert!(nat.ruleset().is_err(), "the table is gone");
    let plain = connect_and_see_source(&guest, &listener).expect("routed without NAT");
    assert_eq!(plain.ip().to_string(), "192.168.100.10");
    Nat::apply(&config, Some(&router)).unwrap();

    // A second network on the same bridge fails and leaves the first alone.
    let err = NatNetwork::start(&config, Some(&router)).unwrap_err();
    assert!(err.to_string().contains("br0"), "{err}");
    assert!(lr.info("br0").unwrap().is_some());
    assert!(network.nat().ruleset().is_ok());

    network.stop().unwrap();
    assert!(lr.info("br0").unwrap().is_none(), "the bridge is gone");
    assert!(Nat::apply(&config, Some(&router))
        .unwrap()
        .ruleset()
        .is_ok());
}

#[test]
fn bad_input_names_what_is_wrong() {
    let Some(mut spaces) = testkit::require_root().then(Namespaces::default) else {
        return;
    };
    let ns = spaces.add("bad");
    let links = Links::in_netns(&ns);
    let err = Tap::create(&TapConfig {
        name: "much-too-long-name",
        netns: Some(&ns),
        ..Default::default()
    })
    .unwrap_err();
    assert!(matches!(err, NetError::BadName { .. }), "{err}");
    assert!(links.info("nosuch0").unwrap().is_none());
    let err = links.set_master("lo", "nosuchbr").unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("ip -n") && text.contains("nosuchbr"),
        "{text}"
    );
    let err = NetNs::create(ns.name()).unwrap_err();
    assert!(err.to_string().contains(ns.name()), "{err}");
    let config = NatConfig {
        name: "x; flush ruleset".into(),
        address: "10.0.0.1/24".parse().unwrap(),
        bridge: "br0".into(),
        outgoing: None,
    };
    let err = Nat::apply(&config, Some(&ns)).unwrap_err();
    assert!(err.to_string().contains("flush ruleset"), "{err}");
}
