//! The lease table: which client (by MAC) holds which address until when,
//! choosing addresses from the range and static host entries, persisted in
//! dnsmasq's lease-file format (`EXPIRY MAC IP HOSTNAME CLIENTID`, one
//! lease a line) with an atomic replace on every change.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use super::packet::{format_mac, parse_mac};
use super::{DhcpConfig, DhcpError};

/// How long an offered address stays reserved for its client.
pub const OFFER_HOLD_S: u64 = 60;

/// One client's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    /// Unix seconds.
    pub expiry: u64,
    pub hostname: Option<String>,
    /// Offered, not yet requested: not persisted, short hold.
    pub offered: bool,
}

/// All leases of one network, by client MAC.
#[derive(Debug)]
pub struct LeaseTable {
    leases: BTreeMap<[u8; 6], Lease>,
    /// Addresses a client declined (in use by someone else), until when.
    declined: BTreeMap<Ipv4Addr, u64>,
    file: PathBuf,
}

impl LeaseTable {
    /// Loads the lease file (a missing file is an empty table). Lines that
    /// do not parse are logged with their number and skipped, so one bad
    /// line cannot take every other client's lease away.
    pub fn load(file: &Path) -> Result<Self, DhcpError> {
        let mut table = LeaseTable {
            leases: BTreeMap::new(),
            declined: BTreeMap::new(),
            file: file.to_owned(),
        };
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(table),
            Err(source) => {
                return Err(DhcpError::Io {
                    path: file.to_owned(),
                    source,
                })
            }
        };
        for (n, line) in text.lines().enumerate() {
            match parse_line(line) {
                Ok(lease) => {
                    table.leases.insert(lease.mac, lease);
                }
                Err(reason) => {
                    tracing::warn!(file = %file.display(), line = n + 1, reason, "skipping a bad lease line")
                }
            }
        }
        Ok(table)
    }

    /// Leases clients hold (offers left out), by address.
    pub fn active(&self, now: u64) -> Vec<Lease> {
        let mut leases: Vec<Lease> = self
            .leases
            .values()
            .filter(|l| !l.offered && l.expiry > now)
            .cloned()
            .collect();
        leases.sort_by_key(|l| l.ip);
        leases
    }

    pub fn get(&self, mac: &[u8; 6]) -> Option<&Lease> {
        self.leases.get(mac)
    }

    /// The address for `mac`: its static entry; else its lease (even
    /// expired) while nobody took the address; else `wanted` if free; else
    /// the first address nobody had; else the one whose lease ran out
    /// longest ago (so a returning client likely finds its old one). `None`
    /// when the range is full.
    pub fn choose(
        &self,
        config: &DhcpConfig,
        mac: &[u8; 6],
        wanted: Option<Ipv4Addr>,
        now: u64,
    ) -> Option<Ipv4Addr> {
        if let Some(host) = config.hosts.iter().find(|h| &h.mac == mac) {
            return Some(host.ip);
        }
        let previous = self.leases.get(mac).map(|l| l.ip);
        if let Some(ip) = previous
            .into_iter()
            .chain(wanted)
            .find(|ip| self.free_for(config, mac, *ip, now))
        {
            return Some(ip);
        }
        let (start, end) = (u32::from(config.range.0), u32::from(config.range.1));
        let never_given =
            |ip: &Ipv4Addr| !self.leases.values().any(|l| l.ip == *ip && &l.mac != mac);
        if let Some(ip) = (start..=end)
            .map(Ipv4Addr::from)
            .find(|ip| never_given(ip) && self.free_for(config, mac, *ip, now))
        {
            return Some(ip);
        }
        self.leases
            .values()
            .filter(|l| l.expiry <= now && config.in_range(l.ip) && !self.is_declined(l.ip, now))
            .min_by_key(|l| l.expiry)
            .map(|l| l.ip)
    }

    /// `ip` may go to `mac`: in the range (or `mac`'s static address), not
    /// another client's static address, lease or offer, and not declined.
    pub fn free_for(&self, config: &DhcpConfig, mac: &[u8; 6], ip: Ipv4Addr, now: u64) -> bool {
        if let Some(host) = config.hosts.iter().find(|h| h.ip == ip) {
            return &host.mac == mac;
        }
        config.in_range(ip)
            && ip != config.server
            && !self.is_declined(ip, now)
            && !self
                .leases
                .values()
                .any(|l| l.ip == ip && &l.mac != mac && l.expiry > now)
    }

    fn is_declined(&self, ip: Ipv4Addr, now: u64) -> bool {
        self.declined.get(&ip).is_some_and(|until| *until > now)
    }

    /// Holds `ip` for `mac` while the client decides (not persisted).
    pub fn offer(&mut self, mac: [u8; 6], ip: Ipv4Addr, hostname: Option<String>, now: u64) {
        // An offer never shortens a lease the client still holds.
        if let Some(l) = self.leases.get(&mac) {
            if l.ip == ip && !l.offered && l.expiry > now {
                return;
            }
        }
        self.take_from_others(mac, ip);
        self.leases.insert(
            mac,
            Lease {
                mac,
                ip,
                expiry: now + OFFER_HOLD_S,
                hostname,
                offered: true,
            },
        );
    }

    /// Binds `ip` to `mac` until `expiry` and saves the table.
    pub fn bind(
        &mut self,
        mac: [u8; 6],
        ip: Ipv4Addr,
        hostname: Option<String>,
        expiry: u64,
    ) -> Result<(), DhcpError> {
        self.take_from_others(mac, ip);
        let hostname = hostname.or_else(|| self.leases.get(&mac).and_then(|l| l.hostname.clone()));
        self.leases.insert(
            mac,
            Lease {
                mac,
                ip,
                expiry,
                hostname,
                offered: false,
            },
        );
        self.save()
    }

    /// A client gave its address back (RELEASE); true if it held `ip`.
    pub fn release(&mut self, mac: &[u8; 6], ip: Ipv4Addr) -> Result<bool, DhcpError> {
        if self.leases.get(mac).is_some_and(|l| l.ip == ip) {
            self.leases.remove(mac);
            self.save()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// A client found `ip` in use (DECLINE): nobody gets it for `hold_s`.
    pub fn decline(&mut self, mac: &[u8; 6], ip: Ipv4Addr, until: u64) -> Result<(), DhcpError> {
        self.declined.insert(ip, until);
        if self.leases.get(mac).is_some_and(|l| l.ip == ip) {
            self.leases.remove(mac);
            self.save()?;
        }
        Ok(())
    }

    /// An expired lease or offer of another client on `ip` is forgotten.
    fn take_from_others(&mut self, mac: [u8; 6], ip: Ipv4Addr) {
        self.leases.retain(|m, l| *m == mac || l.ip != ip);
    }

    /// Writes the bound leases: temporary file, fsync, rename, fsync of the
    /// folder, so a crash leaves the old file or the new one.
    fn save(&self) -> Result<(), DhcpError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| DhcpError::Io { path, source }
        };
        let mut text = String::new();
        for l in self.leases.values().filter(|l| !l.offered) {
            text.push_str(&format!(
                "{} {} {} {} *\n",
                l.expiry,
                format_mac(&l.mac),
                l.ip,
                l.hostname.as_deref().unwrap_or("*")
            ));
        }
        let dir = self.file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let tmp = self.file.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.file).map_err(io(&self.file))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))
    }
}

fn parse_line(line: &str) -> Result<Lease, &'static str> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [expiry, mac, ip, hostname, ..] = fields[..] else {
        return Err("expected EXPIRY MAC IP HOSTNAME [CLIENTID]");
    };
    Ok(Lease {
        expiry: expiry.parse().map_err(|_| "the expiry is not a number")?,
        mac: parse_mac(mac).ok_or("not a MAC address")?,
        ip: ip.parse().map_err(|_| "not an IPv4 address")?,
        hostname: (hostname != "*").then(|| hostname.to_owned()),
        offered: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::dhcp::StaticHost;

    fn config(dir: &Path) -> DhcpConfig {
        DhcpConfig {
            interface: "br0".into(),
            address: "10.9.0.1/24".parse().unwrap(),
            range: (Ipv4Addr::new(10, 9, 0, 2), Ipv4Addr::new(10, 9, 0, 4)),
            lease_time_s: 3600,
            dns: vec![],
            hosts: vec![StaticHost {
                mac: [2, 0, 0, 0, 0, 9],
                ip: Ipv4Addr::new(10, 9, 0, 50),
                name: Some("fixed".into()),
            }],
            leases_file: dir.join("leases"),
            server: Ipv4Addr::new(10, 9, 0, 1),
        }
    }

    fn mac(n: u8) -> [u8; 6] {
        [2, 0, 0, 0, 0, n]
    }

    #[test]
    fn allocates_in_range_and_honours_static_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let mut t = LeaseTable::load(&c.leases_file).unwrap();
        let ip = |n| Ipv4Addr::new(10, 9, 0, n);
        assert_eq!(t.choose(&c, &mac(1), None, 100), Some(ip(2)));
        t.bind(mac(1), ip(2), None, 4000).unwrap();
        // Another client asking for a taken address gets the next free one.
        assert_eq!(t.choose(&c, &mac(2), Some(ip(2)), 100), Some(ip(3)));
        assert_eq!(t.choose(&c, &mac(2), Some(ip(4)), 100), Some(ip(4)));
        assert_eq!(t.choose(&c, &mac(9), Some(ip(3)), 100), Some(ip(50)));
        // Nobody else gets a static address, even when asking for it.
        assert!(!t.free_for(&c, &mac(2), ip(50), 100));
        t.offer(mac(2), ip(3), None, 100);
        t.bind(mac(3), ip(4), None, 4000).unwrap();
        assert_eq!(t.choose(&c, &mac(4), None, 100), None, "range full");
        // Once the offer lapses its address is free again.
        assert_eq!(t.choose(&c, &mac(4), None, 100 + OFFER_HOLD_S), Some(ip(3)));
        // Once a lease runs out, the oldest expired one is reused.
        assert_eq!(t.choose(&c, &mac(4), None, 5000), Some(ip(3)));
    }

    #[test]
    fn release_decline_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let ip = |n| Ipv4Addr::new(10, 9, 0, n);
        let mut t = LeaseTable::load(&c.leases_file).unwrap();
        t.bind(mac(1), ip(2), Some("one".into()), 4000).unwrap();
        t.bind(mac(2), ip(3), None, 4000).unwrap();
        let text = std::fs::read_to_string(&c.leases_file).unwrap();
        assert_eq!(
            text,
            "4000 02:00:00:00:00:01 10.9.0.2 one *\n4000 02:00:00:00:00:02 10.9.0.3 * *\n"
        );
        assert!(!t.release(&mac(1), ip(3)).unwrap(), "not its address");
        assert!(t.release(&mac(1), ip(2)).unwrap());
        t.decline(&mac(2), ip(3), 700).unwrap();
        assert_eq!(t.choose(&c, &mac(5), None, 100), Some(ip(2)));
        assert!(!t.free_for(&c, &mac(5), ip(3), 100), "declined");
        assert!(t.free_for(&c, &mac(5), ip(3), 701), "decline lapsed");
        t.bind(mac(7), ip(4), None, 9000).unwrap();

        let reloaded = LeaseTable::load(&c.leases_file).unwrap();
        assert_eq!(reloaded.active(100), t.active(100));
        assert_eq!(reloaded.active(100).len(), 1);
    }

    #[test]
    fn bad_lease_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("leases");
        std::fs::write(
            &file,
            "garbage\n4000 02:00:00:00:00:01 10.9.0.2 * *\nx 02:00:00:00:00:02 10.9.0.3 * *\n4000 nomac 10.9.0.3 * *\n",
        )
        .unwrap();
        let t = LeaseTable::load(&file).unwrap();
        assert_eq!(t.active(0).len(), 1);
        assert_eq!(t.active(0)[0].ip, Ipv4Addr::new(10, 9, 0, 2));
    }
}
