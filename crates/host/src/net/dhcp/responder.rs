//! The server's decisions (RFC 2131 section 4.3): what to answer to each
//! client message, given the lease table. No sockets here, so every rule
//! is tested directly.

use std::net::Ipv4Addr;

use super::leases::LeaseTable;
use super::packet::{format_mac, opt, MessageType, Packet, BOOTREPLY, BOOTREQUEST, FLAG_BROADCAST};
use super::{DhcpConfig, DhcpError};

/// How long a declined address is kept from everyone (RFC 2131 4.3.3
/// leaves it to the server; dnsmasq uses 10 minutes).
const DECLINE_HOLD_S: u64 = 600;

/// Where a reply goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// 255.255.255.255:68 on the interface: the client has no address yet.
    Broadcast,
    /// The client's own address (it sent `ciaddr`).
    Client(Ipv4Addr),
    /// A relay agent's address (`giaddr`), port 67.
    Relay(Ipv4Addr),
}

#[derive(Debug)]
pub struct Responder {
    config: DhcpConfig,
    table: LeaseTable,
}

impl Responder {
    pub fn new(config: DhcpConfig) -> Result<Self, DhcpError> {
        let table = LeaseTable::load(&config.leases_file)?;
        Ok(Responder { config, table })
    }

    pub fn table(&self) -> &LeaseTable {
        &self.table
    }

    /// The reply to `p` at time `now`, if any. Failures to save the lease
    /// file are logged and answered with a NAK: a lease that would be
    /// lost on restart is not granted.
    pub fn handle(&mut self, p: &Packet, now: u64) -> Option<(Packet, Destination)> {
        if p.op != BOOTREQUEST {
            tracing::debug!(op = p.op, "ignoring a DHCP message that is not a request");
            return None;
        }
        let mac = format_mac(&p.chaddr);
        let result = match p.message_type {
            MessageType::Discover => Ok(self.discover(p, now)),
            MessageType::Request => self.request(p, now),
            MessageType::Decline => self.decline(p, now).map(|()| None),
            MessageType::Release => self.release(p).map(|()| None),
            MessageType::Inform => Ok(self.inform(p)),
            other => {
                tracing::debug!(
                    mac,
                    ?other,
                    "ignoring a server-side message type from a client"
                );
                Ok(None)
            }
        };
        match result {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!(mac, error = %e, "DHCP lease not recorded");
                Some(self.nak(p))
            }
        }
    }

    fn discover(&mut self, p: &Packet, now: u64) -> Option<(Packet, Destination)> {
        let wanted = p.ip_option(opt::REQUESTED_IP);
        let Some(ip) = self.table.choose(&self.config, &p.chaddr, wanted, now) else {
            tracing::warn!(mac = format_mac(&p.chaddr), "DHCP range full: no offer");
            return None;
        };
        self.table.offer(p.chaddr, ip, self.host_name(p), now);
        tracing::debug!(mac = format_mac(&p.chaddr), %ip, "DHCPOFFER");
        Some(self.reply(p, MessageType::Offer, ip, true))
    }

    fn request(
        &mut self,
        p: &Packet,
        now: u64,
    ) -> Result<Option<(Packet, Destination)>, DhcpError> {
        if let Some(server) = p.ip_option(opt::SERVER_ID) {
            if server != self.config.server {
                // The client took another server's offer.
                tracing::debug!(mac = format_mac(&p.chaddr), %server, "client chose another server");
                return Ok(None);
            }
        }
        let ip = p.ip_option(opt::REQUESTED_IP).unwrap_or(p.ciaddr);
        if ip.is_unspecified() {
            tracing::warn!(
                mac = format_mac(&p.chaddr),
                "DHCPREQUEST without an address: dropped"
            );
            return Ok(None);
        }
        if !self.may_have(p, ip, now) {
            tracing::info!(mac = format_mac(&p.chaddr), %ip, "DHCPNAK");
            return Ok(Some(self.nak(p)));
        }
        let expiry = now + u64::from(self.config.lease_time_s);
        self.table.bind(p.chaddr, ip, self.host_name(p), expiry)?;
        tracing::info!(mac = format_mac(&p.chaddr), %ip, "DHCPACK");
        Ok(Some(self.reply(p, MessageType::Ack, ip, true)))
    }

    /// The client may hold `ip`: its static address if it has one, else
    /// an address of the range nobody else holds.
    fn may_have(&self, p: &Packet, ip: Ipv4Addr, now: u64) -> bool {
        match self.config.hosts.iter().find(|h| h.mac == p.chaddr) {
            Some(host) => host.ip == ip,
            None => self.table.free_for(&self.config, &p.chaddr, ip, now),
        }
    }

    fn decline(&mut self, p: &Packet, now: u64) -> Result<(), DhcpError> {
        let ours = p
            .ip_option(opt::SERVER_ID)
            .is_none_or(|s| s == self.config.server);
        match p.ip_option(opt::REQUESTED_IP) {
            Some(ip) if ours => {
                tracing::warn!(mac = format_mac(&p.chaddr), %ip, "DHCPDECLINE: address in use");
                self.table.decline(&p.chaddr, ip, now + DECLINE_HOLD_S)
            }
            _ => Ok(()),
        }
    }

    fn release(&mut self, p: &Packet) -> Result<(), DhcpError> {
        if self.table.release(&p.chaddr, p.ciaddr)? {
            tracing::info!(mac = format_mac(&p.chaddr), ip = %p.ciaddr, "DHCPRELEASE");
        }
        Ok(())
    }

    fn inform(&self, p: &Packet) -> Option<(Packet, Destination)> {
        if p.ciaddr.is_unspecified() {
            return None;
        }
        Some(self.reply(p, MessageType::Ack, Ipv4Addr::UNSPECIFIED, false))
    }

    fn host_name(&self, p: &Packet) -> Option<String> {
        self.config
            .hosts
            .iter()
            .find(|h| h.mac == p.chaddr)
            .and_then(|h| h.name.clone())
            .or_else(|| p.host_name())
    }

    /// An OFFER or ACK with the network's options (`lease`: with lease
    /// times, which an INFORM's ACK must not carry).
    fn reply(
        &self,
        p: &Packet,
        kind: MessageType,
        yiaddr: Ipv4Addr,
        lease: bool,
    ) -> (Packet, Destination) {
        let c = &self.config;
        let subnet = c.address.network();
        let mask = Ipv4Addr::from(
            u32::MAX
                .checked_shl(32 - u32::from(subnet.prefix))
                .unwrap_or(0),
        );
        let broadcast = Ipv4Addr::from(u32::from(subnet.addr) | !u32::from(mask));
        let mut options = vec![
            (opt::SERVER_ID, c.server.octets().to_vec()),
            (opt::SUBNET_MASK, mask.octets().to_vec()),
            (opt::ROUTER, c.address.addr.octets().to_vec()),
            (opt::BROADCAST, broadcast.octets().to_vec()),
        ];
        if !c.dns.is_empty() {
            options.push((opt::DNS, c.dns.iter().flat_map(|ip| ip.octets()).collect()));
        }
        if lease {
            let t = c.lease_time_s;
            options.push((opt::LEASE_TIME, t.to_be_bytes().to_vec()));
            options.push((opt::RENEWAL_TIME, (t / 2).to_be_bytes().to_vec()));
            options.push((opt::REBINDING_TIME, (t / 8 * 7).to_be_bytes().to_vec()));
            if let Some(name) = c
                .hosts
                .iter()
                .find(|h| h.mac == p.chaddr)
                .and_then(|h| h.name.as_ref())
            {
                options.push((opt::HOST_NAME, name.as_bytes().to_vec()));
            }
        }
        let reply = Packet {
            op: BOOTREPLY,
            xid: p.xid,
            secs: 0,
            flags: p.flags,
            ciaddr: if kind == MessageType::Ack {
                p.ciaddr
            } else {
                Ipv4Addr::UNSPECIFIED
            },
            yiaddr,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: p.giaddr,
            chaddr: p.chaddr,
            message_type: kind,
            options,
        };
        (reply, destination(p, kind))
    }

    fn nak(&self, p: &Packet) -> (Packet, Destination) {
        let reply = Packet {
            op: BOOTREPLY,
            xid: p.xid,
            secs: 0,
            flags: p.flags | FLAG_BROADCAST,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: p.giaddr,
            chaddr: p.chaddr,
            message_type: MessageType::Nak,
            options: vec![(opt::SERVER_ID, self.config.server.octets().to_vec())],
        };
        (reply, destination(p, MessageType::Nak))
    }
}

/// RFC 2131 4.1: to a relay if one forwarded the request; a NAK is
/// broadcast; to the client's address if it has one; else broadcast.
fn destination(p: &Packet, kind: MessageType) -> Destination {
    if !p.giaddr.is_unspecified() {
        Destination::Relay(p.giaddr)
    } else if kind == MessageType::Nak || p.ciaddr.is_unspecified() {
        Destination::Broadcast
    } else {
        Destination::Client(p.ciaddr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::dhcp::StaticHost;

    fn config(dir: &std::path::Path) -> DhcpConfig {
        DhcpConfig {
            interface: "br0".into(),
            address: "10.9.0.1/24".parse().unwrap(),
            server: Ipv4Addr::new(10, 9, 0, 1),
            range: (Ipv4Addr::new(10, 9, 0, 10), Ipv4Addr::new(10, 9, 0, 20)),
            lease_time_s: 3600,
            dns: vec![Ipv4Addr::new(9, 9, 9, 9)],
            hosts: vec![StaticHost {
                mac: [2, 0, 0, 0, 0, 0x99],
                ip: Ipv4Addr::new(10, 9, 0, 99),
                name: Some("fixed".into()),
            }],
            leases_file: dir.join("leases"),
        }
    }

    fn msg(kind: MessageType, mac: u8, options: Vec<(u8, Vec<u8>)>) -> Packet {
        Packet {
            op: BOOTREQUEST,
            xid: 7,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [2, 0, 0, 0, 0, mac],
            message_type: kind,
            options,
        }
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 9, 0, n)
    }

    fn request(mac: u8, want: Ipv4Addr) -> Packet {
        msg(
            MessageType::Request,
            mac,
            vec![
                (opt::REQUESTED_IP, want.octets().to_vec()),
                (opt::SERVER_ID, vec![10, 9, 0, 1]),
            ],
        )
    }

    #[test]
    fn discover_offer_request_ack() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Responder::new(config(dir.path())).unwrap();
        let (offer, to) = r
            .handle(&msg(MessageType::Discover, 1, vec![]), 100)
            .unwrap();
        assert_eq!(
            (offer.message_type, offer.yiaddr, to),
            (MessageType::Offer, ip(10), Destination::Broadcast)
        );
        assert_eq!(offer.op, BOOTREPLY);
        assert_eq!(
            offer.ip_option(opt::SUBNET_MASK),
            Some(Ipv4Addr::new(255, 255, 255, 0))
        );
        assert_eq!(offer.ip_option(opt::ROUTER), Some(ip(1)));
        assert_eq!(offer.ip_option(opt::DNS), Some(Ipv4Addr::new(9, 9, 9, 9)));
        assert_eq!(offer.ip_option(opt::BROADCAST), Some(ip(255)));
        assert_eq!(
            offer.option(opt::LEASE_TIME),
            Some(3600u32.to_be_bytes().to_vec())
        );
        // A second client is offered another address while the first decides.
        let (other, _) = r
            .handle(&msg(MessageType::Discover, 2, vec![]), 101)
            .unwrap();
        assert_eq!(other.yiaddr, ip(11));

        let (ack, _) = r.handle(&request(1, ip(10)), 102).unwrap();
        assert_eq!((ack.message_type, ack.yiaddr), (MessageType::Ack, ip(10)));
        assert_eq!(r.table().active(102)[0].expiry, 102 + 3600);
        // Client 2 asking for client 1's address is refused.
        let (nak, to) = r.handle(&request(2, ip(10)), 103).unwrap();
        assert_eq!(
            (nak.message_type, to),
            (MessageType::Nak, Destination::Broadcast)
        );
        // Renewal: unicast back to the client's address.
        let mut renew = msg(MessageType::Request, 1, vec![]);
        renew.ciaddr = ip(10);
        let (ack, to) = r.handle(&renew, 2000).unwrap();
        assert_eq!(
            (ack.message_type, ack.ciaddr, to),
            (MessageType::Ack, ip(10), Destination::Client(ip(10)))
        );
    }

    #[test]
    fn static_hosts_get_their_address_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Responder::new(config(dir.path())).unwrap();
        let wants_other = msg(
            MessageType::Discover,
            0x99,
            vec![(opt::REQUESTED_IP, vec![10, 9, 0, 12])],
        );
        let (offer, _) = r.handle(&wants_other, 100).unwrap();
        assert_eq!(offer.yiaddr, ip(99));
        assert_eq!(offer.option(opt::HOST_NAME).unwrap(), b"fixed");
        let (nak, _) = r.handle(&request(0x99, ip(12)), 100).unwrap();
        assert_eq!(nak.message_type, MessageType::Nak);
        let (nak, _) = r.handle(&request(3, ip(99)), 100).unwrap();
        assert_eq!(
            nak.message_type,
            MessageType::Nak,
            "another client's static address"
        );
        let (ack, _) = r.handle(&request(0x99, ip(99)), 100).unwrap();
        assert_eq!(ack.message_type, MessageType::Ack);
        assert_eq!(r.table().active(100)[0].hostname.as_deref(), Some("fixed"));
    }

    #[test]
    fn other_servers_release_decline_inform() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Responder::new(config(dir.path())).unwrap();
        r.handle(&msg(MessageType::Discover, 1, vec![]), 100)
            .unwrap();
        let mut elsewhere = request(1, ip(10));
        elsewhere.options[1].1 = vec![10, 9, 0, 254];
        assert!(r.handle(&elsewhere, 100).is_none());
        r.handle(&request(1, ip(10)), 100).unwrap();
        let mut release = msg(MessageType::Release, 1, vec![]);
        release.ciaddr = ip(10);
        assert!(r.handle(&release, 101).is_none());
        assert!(r.table().active(101).is_empty());

        let decline = msg(
            MessageType::Decline,
            2,
            vec![(opt::REQUESTED_IP, ip(10).octets().to_vec())],
        );
        assert!(r.handle(&decline, 102).is_none());
        let (offer, _) = r
            .handle(&msg(MessageType::Discover, 3, vec![]), 103)
            .unwrap();
        assert_eq!(offer.yiaddr, ip(11), "a declined address is held back");

        let mut inform = msg(MessageType::Inform, 4, vec![]);
        inform.ciaddr = ip(200);
        let (ack, to) = r.handle(&inform, 104).unwrap();
        assert_eq!(
            (ack.message_type, ack.yiaddr, to),
            (
                MessageType::Ack,
                Ipv4Addr::UNSPECIFIED,
                Destination::Client(ip(200))
            )
        );
        assert!(ack.option(opt::LEASE_TIME).is_none());
        assert_eq!(ack.ip_option(opt::ROUTER), Some(ip(1)));

        let mut reply_from_client = msg(MessageType::Offer, 5, vec![]);
        assert!(r.handle(&reply_from_client, 105).is_none());
        reply_from_client.op = BOOTREPLY;
        reply_from_client.message_type = MessageType::Discover;
        assert!(r.handle(&reply_from_client, 105).is_none());
        let mut relayed = msg(MessageType::Discover, 6, vec![]);
        relayed.giaddr = Ipv4Addr::new(10, 1, 1, 1);
        assert_eq!(
            r.handle(&relayed, 106).unwrap().1,
            Destination::Relay(relayed.giaddr)
        );
    }

    #[test]
    fn an_unwritable_lease_file_gets_a_nak() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.leases_file = dir.path().join("sub/leases");
        let mut r = Responder::new(c).unwrap();
        // The lease file's folder cannot be made: a file is in the way.
        std::fs::write(dir.path().join("sub"), "").unwrap();
        let (nak, _) = r.handle(&request(1, ip(10)), 100).unwrap();
        assert_eq!(nak.message_type, MessageType::Nak);
    }

    #[test]
    fn configs_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = config(dir.path());
        good.validate().unwrap();
        type Spoil = dyn Fn(&mut DhcpConfig);
        let cases: [(&Spoil, &str); 5] = [
            (
                &|c| c.range.1 = Ipv4Addr::new(10, 9, 1, 5),
                "outside the network",
            ),
            (&|c| c.range = (ip(20), ip(10)), "comes after"),
            (&|c| c.lease_time_s = 5, "at least 60"),
            (&|c| c.hosts[0].ip = ip(1), "not a client address"),
            (&|c| c.hosts.push(c.hosts[0].clone()), "clashes"),
        ];
        for (spoil, expected) in cases {
            let mut c = good.clone();
            spoil(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{err} lacks {expected}");
        }
    }
}
