//! `net`: TCP and UDP echo servers on `probe.port` at `probe.ip`
//! (A.B.C.D/NN, or `dhcp`: an address from the network's DHCP server,
//! renewed while the probe runs) over a virtio-net device, with smoltcp for
//! TCP/IP. One TCP
//! connection at a time; it echoes every byte. A connection whose first four
//! bytes are `quit` ends the run (`PROBE DONE ok`). Every UDP datagram is
//! sent back to its sender.
//!
//! Lines: `PROBE RESULT net dhcp ip=A.B.C.D/NN router=... dns=...` when a
//! lease is bound, `PROBE RESULT net listening ip=... port=... mac=...` once the
//! servers are up, `PROBE RESULT net tcp_bytes=N tcp_connections=C
//! udp_datagrams=D tx_errors=E` at the end.

use super::Workload;
use crate::rt::fail::Fail;
use crate::rt::tsc::{self, Tsc};
use crate::rt::virtio::{self, ProbeHal};
use crate::{fail, say};
use oxvirt_probe::netaddr;
use oxvirt_probe::{bootinfo::BootInfo, params::Params};
use smoltcp::iface::{Config, Interface, SocketSet, SocketStorage};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::{dhcpv4, tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::DeviceType;

pub const WORKLOAD: Workload = Workload {
    name: "net",
    keys: &["ip", "port"],
    run,
};

/// Receive buffers posted to the device (the ring holds this many).
const RX_SLOTS: usize = 16;
/// A virtio-net header (12 bytes) and a 1514-byte Ethernet frame fit.
const FRAME_BUF: usize = 2048;
const MTU: usize = 1514;
const TCP_BUF: usize = 64 * 1024;
const UDP_BUF: usize = 64 * 1024;
const UDP_PACKETS: usize = 64;
/// How long `probe.ip=dhcp` waits for its first lease.
const DHCP_TIMEOUT_S: f64 = 30.0;

type Net = VirtIONetRaw<ProbeHal, MmioTransport<'static>, RX_SLOTS>;

/// smoltcp's view of the virtio-net device: frames received into posted
/// DMA buffers are copied out to `frame` and the buffer is posted again.
struct VirtioPhy {
    net: Net,
    rx: [(&'static mut [u8], Option<u16>); RX_SLOTS],
    frame: &'static mut [u8],
    tx: &'static mut [u8],
    tx_errors: u64,
}

struct RxToken<'a>(&'a [u8]);

struct TxToken<'a> {
    net: &'a mut Net,
    buf: &'a mut [u8],
    errors: &'a mut u64,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let result = f(&mut self.buf[..len]);
        // A frame the device refuses is a lost frame: TCP resends it.
        if self.net.send(&self.buf[..len]).is_err() {
            *self.errors += 1;
        }
        result
    }
}

impl VirtioPhy {
    fn new(mut net: Net) -> Result<Self, Fail> {
        let mut rx = core::array::from_fn(|_| (&mut [][..], None));
        for (buf, token) in &mut rx {
            *buf = virtio::alloc(FRAME_BUF)?;
            // SAFETY: the buffer is DMA memory used by nothing else until
            // `receive` completes this token.
            *token = Some(unsafe { net.receive_begin(buf) }?);
        }
        Ok(VirtioPhy {
            net,
            rx,
            frame: virtio::alloc(FRAME_BUF)?,
            tx: virtio::alloc(FRAME_BUF)?,
            tx_errors: 0,
        })
    }

    /// Copies the next received frame into `frame`; its length.
    fn next_frame(&mut self) -> Option<usize> {
        let token = self.net.poll_receive()?;
        let (buf, slot_token) = self.rx.iter_mut().find(|(_, t)| *t == Some(token))?;
        // SAFETY: `buf` is the buffer posted with this token.
        let received = unsafe { self.net.receive_complete(token, buf) };
        let len = received.ok().and_then(|(header, len)| {
            let frame = buf.get(header..header + len)?;
            self.frame[..len].copy_from_slice(frame);
            Some(len)
        });
        // SAFETY: as in `new`: the buffer is free again and reposted.
        *slot_token = unsafe { self.net.receive_begin(buf) }.ok();
        len
    }
}

impl phy::Device for VirtioPhy {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let len = self.next_frame()?;
        Some((
            RxToken(&self.frame[..len]),
            TxToken {
                net: &mut self.net,
                buf: self.tx,
                errors: &mut self.tx_errors,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            net: &mut self.net,
            buf: self.tx,
            errors: &mut self.tx_errors,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps
    }
}

#[derive(Default)]
struct Counters {
    tcp_bytes: u64,
    tcp_connections: u64,
    udp_datagrams: u64,
}

fn run(boot: &BootInfo, params: &Params) -> Result<(), Fail> {
    let Some(ip) = params.get("ip") else {
        return fail!("net: probe.ip=A.B.C.D/NN or probe.ip=dhcp is missing");
    };
    let fixed = match ip {
        "dhcp" => None,
        _ => Some(
            netaddr::parse_cidr(ip)
                .map_err(|why| Fail::new(format_args!("probe.ip={ip}: {why}")))?,
        ),
    };
    let port = params.u64("port", 7, 1, 65535)? as u16;
    let clock = Tsc::detect()?;
    virtio::init(boot);
    let net = Net::new(virtio::find(boot, DeviceType::Network)?)?;
    let mac = net.mac_address();
    let mut device = VirtioPhy::new(net)?;

    let now = || Instant::from_micros((clock.seconds(tsc::now()) * 1e6) as i64);
    let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    let mut iface = Interface::new(config, &mut device, now());

    let mut storage = [SocketStorage::EMPTY; 3];
    let mut sockets = SocketSet::new(&mut storage[..]);
    let dhcp_handle = match fixed {
        Some(cidr) => {
            let [a, b, c, d] = cidr.addr;
            set_address(
                &mut iface,
                Ipv4Cidr::new(Ipv4Address::new(a, b, c, d), cidr.prefix),
            );
            None
        }
        None => {
            let handle = sockets.add(dhcpv4::Socket::new());
            let deadline = clock.seconds(tsc::now()) + DHCP_TIMEOUT_S;
            while iface.ipv4_addr().is_none() {
                if clock.seconds(tsc::now()) > deadline {
                    return fail!("net: no DHCP lease within {DHCP_TIMEOUT_S} s");
                }
                iface.poll(now(), &mut device, &mut sockets);
                take_dhcp_event(&mut iface, sockets.get_mut::<dhcpv4::Socket>(handle));
            }
            Some(handle)
        }
    };
    let mut tcp_socket = tcp::Socket::new(
        tcp::SocketBuffer::new(virtio::alloc(TCP_BUF)?),
        tcp::SocketBuffer::new(virtio::alloc(TCP_BUF)?),
    );
    // An echo server answers at once: Nagle and delayed ACKs would only
    // stall it against the peer's own delayed ACKs.
    tcp_socket.set_nagle_enabled(false);
    tcp_socket.set_ack_delay(None);
    let mut udp_rx_meta = [udp::PacketMetadata::EMPTY; UDP_PACKETS];
    let mut udp_tx_meta = [udp::PacketMetadata::EMPTY; UDP_PACKETS];
    let mut udp_socket = udp::Socket::new(
        udp::PacketBuffer::new(&mut udp_rx_meta[..], virtio::alloc(UDP_BUF)?),
        udp::PacketBuffer::new(&mut udp_tx_meta[..], virtio::alloc(UDP_BUF)?),
    );
    udp_socket
        .bind(port)
        .map_err(|err| Fail::new(format_args!("net: UDP port {port}: {err}")))?;
    let tcp_handle = sockets.add(tcp_socket);
    let udp_handle = sockets.add(udp_socket);
    let Some(listening) = iface.ip_addrs().first().copied() else {
        return fail!("net: the interface has no address");
    };
    say!(
        "PROBE RESULT net listening ip={listening} port={port} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    );

    let mut counters = Counters::default();
    let mut fresh = true;
    let scratch = virtio::alloc(TCP_BUF)?;
    loop {
        iface.poll(now(), &mut device, &mut sockets);
        if let Some(handle) = dhcp_handle {
            take_dhcp_event(&mut iface, sockets.get_mut::<dhcpv4::Socket>(handle));
        }
        let tcp = sockets.get_mut::<tcp::Socket>(tcp_handle);
        if !tcp.is_open() {
            tcp.listen(port)
                .map_err(|err| Fail::new(format_args!("net: TCP port {port}: {err}")))?;
            fresh = true;
        }
        if fresh && tcp.is_active() && tcp.recv_queue() >= 4 {
            counters.tcp_connections += 1;
            fresh = false;
            if tcp.peek(4).is_ok_and(|first| first == b"quit") {
                tcp.close();
                iface.poll(now(), &mut device, &mut sockets);
                break;
            }
        }
        echo_tcp(tcp, scratch, &mut counters);
        if !tcp.may_recv() && tcp.may_send() && tcp.send_queue() == 0 {
            tcp.close();
        }
        echo_udp(
            sockets.get_mut::<udp::Socket>(udp_handle),
            scratch,
            &mut counters,
        );
    }
    say!(
        "PROBE RESULT net tcp_bytes={} tcp_connections={} udp_datagrams={} tx_errors={}",
        counters.tcp_bytes,
        counters.tcp_connections,
        counters.udp_datagrams,
        device.tx_errors
    );
    Ok(())
}

fn set_address(iface: &mut Interface, cidr: Ipv4Cidr) {
    iface.update_ip_addrs(|addrs| {
        addrs.clear();
        let _ = addrs.push(IpCidr::Ipv4(cidr));
    });
}

/// Applies a new or lost DHCP lease to the interface (address and default
/// route) and reports it.
fn take_dhcp_event(iface: &mut Interface, dhcp: &mut dhcpv4::Socket) {
    match dhcp.poll() {
        None => {}
        Some(dhcpv4::Event::Configured(lease)) => {
            set_address(iface, lease.address);
            let routes = iface.routes_mut();
            routes.remove_default_ipv4_route();
            if let Some(router) = lease.router {
                // The table has room for the default route: it was just removed.
                let _ = routes.add_default_ipv4_route(router);
            }
            say!(
                "PROBE RESULT net dhcp ip={} router={} dns={}",
                lease.address,
                lease.router.unwrap_or(Ipv4Address::UNSPECIFIED),
                lease
                    .dns_servers
                    .first()
                    .copied()
                    .unwrap_or(Ipv4Address::UNSPECIFIED)
            );
        }
        // The socket also says so once at the start, before any lease.
        Some(dhcpv4::Event::Deconfigured) if iface.ipv4_addr().is_some() => {
            iface.update_ip_addrs(|addrs| addrs.clear());
            iface.routes_mut().remove_default_ipv4_route();
            say!("PROBE RESULT net dhcp lease lost");
        }
        Some(dhcpv4::Event::Deconfigured) => {}
    }
}

/// Moves what was received to the send buffer, as much as it has room for.
fn echo_tcp(tcp: &mut tcp::Socket, scratch: &mut [u8], counters: &mut Counters) {
    let room = tcp.send_capacity() - tcp.send_queue();
    if room == 0 || !tcp.can_recv() {
        return;
    }
    let len = tcp.recv_slice(&mut scratch[..room]).unwrap_or(0);
    let sent = tcp.send_slice(&scratch[..len]).unwrap_or(0);
    counters.tcp_bytes += sent as u64;
}

fn echo_udp(udp: &mut udp::Socket, scratch: &mut [u8], counters: &mut Counters) {
    while let Ok((len, meta)) = udp.recv_slice(scratch) {
        if udp.send_slice(&scratch[..len], meta.endpoint).is_ok() {
            counters.udp_datagrams += 1;
        }
    }
}
