//! A DHCPv4 server for a VM network (RFC 2131, options from RFC 2132), what
//! libvirt gets from dnsmasq: addresses from a range, fixed addresses by
//! MAC, leases kept in a file across restarts.
//!
//! It answers on UDP port 67 of one interface (the network's bridge,
//! `SO_BINDTODEVICE`), from a thread of its own. Replies go out as
//! broadcasts unless the client already has its address (renewals,
//! INFORM), so no ARP entry has to be planted for a client without one.

mod leases;
mod packet;
mod responder;

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

pub use leases::{Lease, LeaseTable};
pub use packet::{format_mac, opt, parse_mac, MessageType, Packet, BOOTREPLY, BOOTREQUEST};
pub use responder::{Destination, Responder};

use super::{Ipv4Cidr, NetError, NetNs};

const SERVER_PORT: u16 = 67;
const CLIENT_PORT: u16 = 68;
/// How often the serving thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(200);
/// At most one warning per this long about dropped messages, so a guest
/// sending garbage cannot flood the log.
const DROP_WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("malformed DHCP message: {reason}")]
    Malformed { reason: String },
    #[error("DHCP {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("DHCP socket on {interface}: {op}: {source}")]
    Socket {
        interface: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Net(#[from] NetError),
}

/// A fixed address for one client (libvirt's `<host mac= ip= name=>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticHost {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub name: Option<String>,
}

/// What the server hands out, on which interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    /// The interface it answers on (the network's bridge).
    pub interface: String,
    /// The interface's address and prefix: the router and subnet clients get.
    pub address: Ipv4Cidr,
    /// The server identifier (normally `address.addr`).
    pub server: Ipv4Addr,
    /// First and last address handed out, both inclusive.
    pub range: (Ipv4Addr, Ipv4Addr),
    pub lease_time_s: u32,
    /// Name servers; none: the option is left out.
    pub dns: Vec<Ipv4Addr>,
    pub hosts: Vec<StaticHost>,
    /// Where leases are kept (dnsmasq's format).
    pub leases_file: PathBuf,
}

impl DhcpConfig {
    /// Checks that the range and the hosts fit the subnet and do not clash.
    pub fn validate(&self) -> Result<(), DhcpError> {
        let bad = |field, reason: String| Err(DhcpError::Config { field, reason });
        let subnet = self.address.network();
        let (start, end) = self.range;
        for (field, ip) in [("range start", start), ("range end", end)] {
            if !subnet_contains(subnet, ip) {
                return bad(field, format!("{ip} is outside the network {subnet}"));
            }
        }
        if u32::from(start) > u32::from(end) {
            return bad("range", format!("{start} comes after {end}"));
        }
        if self.lease_time_s < 60 {
            return bad(
                "lease time",
                format!("{} s: at least 60 s", self.lease_time_s),
            );
        }
        for (i, host) in self.hosts.iter().enumerate() {
            if !subnet_contains(subnet, host.ip) || host.ip == self.address.addr {
                return bad(
                    "host ip",
                    format!("{}: not a client address of {subnet}", host.ip),
                );
            }
            if let Some(other) = self.hosts[..i]
                .iter()
                .find(|h| h.mac == host.mac || h.ip == host.ip)
            {
                return bad(
                    "host",
                    format!(
                        "{} {} clashes with {} {}",
                        format_mac(&host.mac),
                        host.ip,
                        format_mac(&other.mac),
                        other.ip
                    ),
                );
            }
        }
        Ok(())
    }

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.range.0)..=u32::from(self.range.1)).contains(&u32::from(ip))
    }
}

fn subnet_contains(subnet: Ipv4Cidr, ip: Ipv4Addr) -> bool {
    Ipv4Cidr {
        addr: ip,
        prefix: subnet.prefix,
    }
    .network()
        == subnet
}

/// The name servers of the host's `/etc/resolv.conf` that a guest can
/// reach (loopback resolvers such as systemd-resolved's are left out).
pub fn host_name_servers() -> Vec<Ipv4Addr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<Ipv4Addr>().ok())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect()
}

/// Seconds since the epoch (lease times are wall-clock, as in the file).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A running server; stopped when dropped.
#[derive(Debug)]
pub struct DhcpServer {
    interface: String,
    responder: Arc<Mutex<Responder>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DhcpServer {
    /// Loads the leases and starts answering on `config.interface` in `ns`
    /// (the caller's namespace when `None`).
    pub fn start(config: DhcpConfig, ns: Option<&NetNs>) -> Result<Self, DhcpError> {
        config.validate()?;
        let socket = match ns {
            Some(ns) => ns.run(|| open_socket(&config.interface))??,
            None => open_socket(&config.interface)?,
        };
        socket
            .set_read_timeout(Some(POLL))
            .map_err(|source| DhcpError::Socket {
                interface: config.interface.clone(),
                op: "setting a read timeout",
                source,
            })?;
        let interface = config.interface.clone();
        let responder = Arc::new(Mutex::new(Responder::new(config)?));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("dhcp-{interface}"))
            .spawn({
                let (responder, stop) = (responder.clone(), stop.clone());
                move || serve(&socket, &responder, &stop)
            })
            .map_err(|source| DhcpError::Socket {
                interface: interface.clone(),
                op: "starting its thread",
                source,
            })?;
        tracing::info!(interface, "DHCP server started");
        Ok(DhcpServer {
            interface,
            responder,
            stop,
            thread: Some(thread),
        })
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The leases clients hold now, by address.
    pub fn leases(&self) -> Vec<Lease> {
        self.lock().table().active(unix_now())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Responder> {
        self.responder.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for DhcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        tracing::info!(interface = self.interface, "DHCP server stopped");
    }
}

/// Logs dropped messages: a warning now and then, the rest at debug level.
#[derive(Default)]
struct DropLog {
    last_warning: Option<std::time::Instant>,
    since: u64,
}

impl DropLog {
    fn dropped(&mut self, from: std::net::SocketAddr, len: usize, error: &DhcpError) {
        let due = self
            .last_warning
            .is_none_or(|t| t.elapsed() >= DROP_WARN_EVERY);
        if due {
            let suppressed = self.since;
            tracing::warn!(%from, len, %error, suppressed, "dropping a DHCP message");
            self.last_warning = Some(std::time::Instant::now());
            self.since = 0;
        } else {
            tracing::debug!(%from, len, %error, "dropping a DHCP message");
            self.since += 1;
        }
    }
}

/// UDP port 67 on `interface` only, allowed to broadcast. Binding to the
/// device first lets servers for several bridges share the port.
fn open_socket(interface: &str) -> Result<UdpSocket, DhcpError> {
    let err = |op| {
        let interface = interface.to_owned();
        move |e: nix::Error| DhcpError::Socket {
            interface,
            op,
            source: std::io::Error::from(e),
        }
    };
    let fd: OwnedFd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err("creating"))?;
    socket::setsockopt(&fd, sockopt::BindToDevice, &OsString::from(interface))
        .map_err(err("binding to the device"))?;
    socket::setsockopt(&fd, sockopt::Broadcast, &true).map_err(err("allowing broadcasts"))?;
    let any = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SERVER_PORT));
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &any).map_err(err("binding port 67"))?;
    Ok(UdpSocket::from(fd))
}

fn serve(socket: &UdpSocket, responder: &Mutex<Responder>, stop: &AtomicBool) {
    let mut buf = [0u8; 1500];
    let mut drops = DropLog::default();
    while !stop.load(Ordering::Relaxed) {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                tracing::warn!(error = %e, "DHCP receive failed");
                std::thread::sleep(POLL);
                continue;
            }
        };
        let request = match Packet::decode(&buf[..len]) {
            Ok(p) => p,
            Err(e) => {
                drops.dropped(from, len, &e);
                continue;
            }
        };
        let reply = responder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .handle(&request, unix_now());
        if let Some((reply, to)) = reply {
            let addr = match to {
                Destination::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT),
                Destination::Client(ip) => SocketAddrV4::new(ip, CLIENT_PORT),
                Destination::Relay(ip) => SocketAddrV4::new(ip, SERVER_PORT),
            };
            if let Err(e) = socket.send_to(&reply.encode(), addr) {
                tracing::warn!(%addr, error = %e, "sending a DHCP reply failed");
            }
        }
    }
}
