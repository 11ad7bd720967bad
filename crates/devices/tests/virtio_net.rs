//! virtio-net over a real tap inside a network namespace the test creates.
//! The test driver plays the guest: it answers UDP datagrams that a socket
//! in the namespace sends, through the device's receive and transmit queues.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use devices::rate_limiter::{BucketConfig, LimiterConfig};
use devices::virtio::net::{MacAddr, Net, NetConfig, NetState, Tap, TapConfig};
use devices::virtio::MmioTransport;
use vm_memory::{Bytes, GuestAddress};

const HOST_IP: [u8; 4] = [10, 77, 0, 1];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const GUEST_MAC: &str = "52:54:00:12:34:56";
const FEATURES: u64 = VIRTIO_F_VERSION_1 | 1 << 5 | 1 << 15 | 1 << 16;
const RX_BUF: u32 = 2048;
const RX_BASE: u64 = DATA_BASE;
const TX_BASE: u64 = DATA_BASE + 0x40_0000;
const HDR_LEN: usize = 12;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace holding the host end of the tap; removed on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn prerequisites() -> bool {
    testkit::require_root()
        && testkit::require(
            std::path::Path::new("/dev/net/tun").exists(),
            "/dev/net/tun is missing",
        )
        && testkit::require(
            Command::new("ip").arg("-V").output().is_ok(),
            "iproute2 (ip) is missing",
        )
}

fn open_tap(name: &str) -> Result<Tap, host::net::NetError> {
    Tap::create(&TapConfig {
        name,
        ..TapConfig::default()
    })
}

/// Creates a namespace and a tap whose host end sits in it, addressed
/// 10.77.0.1/24, with the guest's MAC as a static neighbour.
fn tap_in_namespace(tag: &str) -> (Netns, Tap) {
    let suffix = format!("{}{tag}", std::process::id() % 100_000);
    let ns = Netns(format!("oxvirt-virtio-{suffix}"));
    let name = format!("oxvt{suffix}");
    ip(&["netns", "add", &ns.0]);
    let tap = open_tap(&name).expect("open tap");
    ip(&["link", "set", &name, "netns", &ns.0]);
    // No IPv6 link-local address: fewer unsolicited frames from the host.
    ip(&["-n", &ns.0, "link", "set", &name, "addrgenmode", "none"]);
    ip(&["-n", &ns.0, "link", "set", &name, "mtu", "9000", "up"]);
    ip(&["-n", &ns.0, "addr", "add", "10.77.0.1/24", "dev", &name]);
    ip(&[
        "-n",
        &ns.0,
        "neigh",
        "add",
        "10.77.0.2",
        "lladdr",
        GUEST_MAC,
        "dev",
        &name,
    ]);
    (ns, tap)
}

/// A UDP socket created inside the namespace (from a thread that entered it).
fn socket_in(ns: &Netns) -> UdpSocket {
    let path = format!("/run/netns/{}", ns.0);
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = File::open(&path).expect("open netns");
            // SAFETY: setns on a namespace fd we hold open; it only changes
            // this short-lived thread's network namespace.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let sock = UdpSocket::bind("10.77.0.1:0").expect("bind in netns");
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            sock
        })
        .join()
        .unwrap()
    })
}

struct Guest {
    d: Driver<Net>,
    mac: [u8; 6],
    rx_addr: HashMap<u32, u64>,
}

impl Guest {
    fn new(tap: Tap, config: NetConfig) -> Self {
        let mac = config.mac.0;
        let mut d = Driver::new(Net::new(tap, config).unwrap());
        d.init(FEATURES, 2, 256);
        let mut g = Guest {
            d,
            mac,
            rx_addr: HashMap::new(),
        };
        for i in 0..64 {
            g.post_rx(RX_BASE + i * u64::from(RX_BUF));
        }
        g.d.notify(0);
        g
    }

    fn post_rx(&mut self, addr: u64) {
        let head = self.d.queues[0].add_chain(&self.d.mem, &[wr(addr, RX_BUF)]);
        self.rx_addr.insert(u32::from(head), addr);
    }

    /// The next frame the device received (without header), reassembled
    /// from its mergeable buffers, which are posted again.
    fn receive(&mut self) -> Option<Vec<u8>> {
        self.receive_within(Duration::from_secs(5))
    }

    fn receive_within(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let mut frame = Vec::new();
        let (id, len) = self.d.queues[0].wait_used(&self.d.mem, timeout)?;
        let addr = self.rx_addr[&id];
        let num_buffers: u16 = self.d.mem.read_obj(GuestAddress(addr + 10)).unwrap();
        let mut parts = vec![(addr, len)];
        for _ in 1..num_buffers {
            let (id, len) = self.d.queues[0].wait_used(&self.d.mem, Duration::from_secs(5))?;
            parts.push((self.rx_addr[&id], len));
        }
        for (addr, len) in parts {
            let mut buf = vec![0u8; len as usize];
            self.d.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            frame.extend_from_slice(&buf);
            self.post_rx(addr);
        }
        self.d.notify(0);
        Some(frame.split_off(HDR_LEN))
    }

    fn send(&mut self, frame: &[u8]) {
        let mut buf = vec![0u8; HDR_LEN];
        buf.extend_from_slice(frame);
        self.d.mem.write_slice(&buf, GuestAddress(TX_BASE)).unwrap();
        // Header and frame in separate descriptors, as Linux sends them.
        let (_, len) = self.d.submit(
            1,
            &[
                rd(TX_BASE, HDR_LEN as u32),
                rd(TX_BASE + HDR_LEN as u64, frame.len() as u32),
            ],
        );
        assert_eq!(len, 0);
    }

    /// Waits for a UDP datagram to the guest and echoes it back.
    fn echo_one_udp(&mut self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let Some(frame) = self.receive() else { break };
            if let Some(reply) = udp_echo_reply(&frame, self.mac) {
                self.send(&reply);
                return frame.len();
            }
        }
        panic!("no UDP datagram for the guest arrived");
    }
}

/// Builds the reply to an IPv4/UDP frame addressed to the guest: addresses
/// and ports swapped, UDP checksum off (allowed for IPv4).
fn udp_echo_reply(frame: &[u8], mac: [u8; 6]) -> Option<Vec<u8>> {
    let is_udp_v4 = frame.len() >= 42 && frame[12..14] == [8, 0] && frame[23] == 17;
    if !is_udp_v4 || frame[0..6] != mac || frame[30..34] != GUEST_IP {
        return None;
    }
    let mut r = frame.to_vec();
    r.copy_within(6..12, 0);
    r[6..12].copy_from_slice(&mac);
    r[26..30].copy_from_slice(&GUEST_IP);
    r[30..34].copy_from_slice(&HOST_IP);
    let ihl = usize::from(frame[14] & 0xf) * 4;
    let udp = 14 + ihl;
    r[udp..udp + 2].copy_from_slice(&frame[udp + 2..udp + 4]);
    r[udp + 2..udp + 4].copy_from_slice(&frame[udp..udp + 2]);
    r[udp + 6..udp + 8].copy_from_slice(&[0, 0]);
    Some(r)
}

#[test]
fn mac_addresses_parse_and_print() {
    let mac: MacAddr = GUEST_MAC.parse().unwrap();
    assert_eq!(mac.0, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    assert_eq!(mac.to_string(), GUEST_MAC);
    for bad in [
        "52:54:00:12:34",
        "52:54:00:12:34:56:78",
        "52:54:00:12:34:zz",
        "5254:00:12:34:56:7",
    ] {
        let err = bad.parse::<MacAddr>().unwrap_err();
        assert!(err.to_string().contains(bad), "{err}");
    }
    assert!(open_tap("a/b").unwrap_err().to_string().contains("a/b"));
    assert!(open_tap("this-name-is-too-long").is_err());
}

#[test]
fn heavy_net_udp_echo_through_a_tap_with_mergeable_buffers() {
    if !prerequisites() {
        return;
    }
    let (ns, tap) = tap_in_namespace("a");
    let mut g = Guest::new(tap, NetConfig::new(GUEST_MAC.parse().unwrap()));
    // Config space: MAC and link up.
    let mut cfg = [0u8; 8];
    devices::BusDevice::read(&mut g.d.transport, 0x100, &mut cfg);
    assert_eq!(&cfg[..6], &g.mac);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1);

    let sock = socket_in(&ns);
    for size in [64usize, 1400, 6000] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        sock.send_to(&payload, "10.77.0.2:7").unwrap();
        let frame_len = g.echo_one_udp();
        assert_eq!(frame_len, 14 + 20 + 8 + size);
        let mut back = vec![0u8; size + 100];
        let (n, from) = sock.recv_from(&mut back).expect("echo did not come back");
        assert_eq!(from.to_string(), "10.77.0.2:7");
        assert_eq!(&back[..n], &payload[..], "echo of {size} bytes differs");
    }
    let stats = g.d.transport.device().handle().stats();
    assert!(stats.rx_packets >= 3 && stats.tx_packets == 3, "{stats:?}");
    assert_eq!(stats.tx_bytes, (14 + 28) * 3 + 64 + 1400 + 6000);
    assert_eq!(stats.errors, 0);

    // Hostile transmit chains: a device-writable buffer, a buffer outside
    // guest memory, a chain shorter than the header. None reaches the tap.
    assert_eq!(g.d.submit(1, &[wr(TX_BASE, 100)]).1, 0);
    assert_eq!(g.d.submit(1, &[rd(u64::MAX - 50, 100)]).1, 0);
    assert_eq!(g.d.submit(1, &[rd(TX_BASE, 8)]).1, 0);
    let stats = g.d.transport.device().handle().stats();
    assert_eq!((stats.errors, stats.tx_packets), (3, 3));
    // The device still echoes.
    sock.send_to(b"still here", "10.77.0.2:7").unwrap();
    g.echo_one_udp();
    let mut back = [0u8; 16];
    let (n, _) = sock.recv_from(&mut back).unwrap();
    assert_eq!(&back[..n], b"still here");
}

#[test]
fn heavy_net_link_down_drops_traffic_and_tells_the_driver() {
    if !prerequisites() {
        return;
    }
    let (ns, tap) = tap_in_namespace("b");
    let mut g = Guest::new(tap, NetConfig::new(GUEST_MAC.parse().unwrap()));
    let generation = g.d.read_reg(0xfc);
    g.d.transport.update_config(|net| net.set_link_up(false));
    assert_ne!(
        g.d.read_reg(0xfc),
        generation,
        "config generation unchanged"
    );
    assert!(g.d.read_reg(0x60) & 2 != 0, "no config-change interrupt");
    let mut cfg = [0u8; 2];
    devices::BusDevice::read(&mut g.d.transport, 0x106, &mut cfg);
    assert_eq!(cfg, [0, 0], "link still reported up");
    g.send(&[0xff; 60]);
    let sock = socket_in(&ns);
    sock.send_to(b"lost", "10.77.0.2:7").unwrap();
    // Frames the kernel sent before the link went down may still arrive;
    // the datagram sent after must not.
    while let Some(frame) = g.receive_within(Duration::from_millis(300)) {
        assert!(
            udp_echo_reply(&frame, g.mac).is_none(),
            "datagram delivered while link down"
        );
    }
    let stats = g.d.transport.device().handle().stats();
    assert_eq!(stats.tx_dropped, 1);
    assert!(stats.rx_dropped >= 1);
    g.d.transport.update_config(|net| net.set_link_up(true));
    sock.send_to(b"found", "10.77.0.2:7").unwrap();
    g.echo_one_udp();
    let mut back = [0u8; 16];
    let (n, _) = sock.recv_from(&mut back).unwrap();
    assert_eq!(&back[..n], b"found");
}

#[test]
fn heavy_net_tx_packet_limit_and_save_restore() {
    if !prerequisites() {
        return;
    }
    let (ns, tap) = tap_in_namespace("c");
    let mut config = NetConfig::new(GUEST_MAC.parse().unwrap());
    config.tx_limit = LimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig::per_second(50, 0)),
    };
    let mut g = Guest::new(tap, config);
    let start = Instant::now();
    for _ in 0..15 {
        g.send(&[0xff; 60]);
    }
    // 5 packets in the full bucket, 10 more at 50/s.
    let took = start.elapsed().as_secs_f64();
    assert!((0.18..0.4).contains(&took), "15 packets took {took:.2} s");

    // Save, restore over the same tap, and carry on with the same rings.
    let transport_state = g.d.transport.save();
    let state: NetState =
        serde_json::from_str(&serde_json::to_string(&g.d.transport.device().save()).unwrap())
            .unwrap();
    assert_eq!(
        state.config.tx_limit,
        g.d.transport.device().config().tx_limit
    );
    // The paused device gives its tap back for the restored one.
    let tap =
        g.d.transport
            .device_mut()
            .take_tap()
            .expect("tap held by a paused device");
    let mut restored = MmioTransport::restore(
        Net::restore(tap, &state).unwrap(),
        g.d.mem.clone(),
        g.d.irq.clone(),
        &transport_state,
    )
    .unwrap();
    restored.resume();
    g.d.transport = restored;
    let sock = socket_in(&ns);
    sock.send_to(b"after restore", "10.77.0.2:7").unwrap();
    g.echo_one_udp();
    let mut back = [0u8; 32];
    let (n, _) = sock.recv_from(&mut back).unwrap();
    assert_eq!(&back[..n], b"after restore");
}

#[test]
fn heavy_net_rx_packet_limit_set_at_run_time() {
    if !prerequisites() {
        return;
    }
    let (ns, tap) = tap_in_namespace("d");
    let mut g = Guest::new(tap, NetConfig::new(GUEST_MAC.parse().unwrap()));
    let handle = g.d.transport.device().handle();
    let rx = LimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig::per_second(20, 0)),
    };
    handle.set_throttle(rx, LimiterConfig::default()).unwrap();
    assert_eq!(handle.throttle().0, rx);
    let sock = socket_in(&ns);
    let start = Instant::now();
    for i in 0..8u8 {
        sock.send_to(&[i; 32], "10.77.0.2:9").unwrap();
    }
    let mut got = 0;
    while got < 8 {
        let frame = g.receive().expect("frame held back for good");
        if udp_echo_reply(&frame, g.mac).is_some() {
            got += 1;
        }
    }
    // 2 frames in the full bucket, 6 more at 20/s.
    let took = start.elapsed().as_secs_f64();
    assert!((0.27..0.5).contains(&took), "8 frames took {took:.2} s");
}
