//! Network definitions: one human-editable TOML file per virtual network
//! (libvirt's `<network>`), checked strictly and written atomically.
//!
//! ```toml
//! name = "default"
//! bridge = "oxvirbr0"
//! address = "192.168.124.1/24"   # the bridge's address: guests' router
//! forward = "nat"                # or "none" (an isolated network)
//!
//! [dhcp]
//! start = "192.168.124.2"
//! end = "192.168.124.254"
//! lease_seconds = 3600
//! dns = ["192.0.2.53"]           # default: the host's resolvers
//!
//! [[dhcp.host]]
//! mac = "52:54:00:12:34:56"
//! ip = "192.168.124.10"
//! name = "web"
//! ```

use std::net::Ipv4Addr;
use std::path::Path;

use host::net::dhcp::{parse_mac, DhcpConfig, StaticHost};
use host::net::{Ipv4Cidr, NatConfig};
use serde::{Deserialize, Serialize};

use crate::network::NetworkError;

/// The longest network name (the NAT table is `oxvirt_<name>`).
const MAX_NAME: usize = 32;
const DEFAULT_LEASE_S: u32 = 3600;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkDef {
    pub name: String,
    pub bridge: String,
    /// The bridge's address and prefix, `192.168.124.1/24`.
    pub address: String,
    #[serde(default)]
    pub forward: Forward,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpDef>,
}

/// What leaves the network: NAT to the host's other networks, or nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    #[default]
    Nat,
    None,
}

impl std::fmt::Display for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Forward::Nat => "nat",
            Forward::None => "none",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpDef {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
    #[serde(default = "default_lease")]
    pub lease_seconds: u32,
    /// Name servers handed out; unset: the host's (from /etc/resolv.conf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Vec<Ipv4Addr>>,
    #[serde(default, rename = "host", skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostDef>,
}

fn default_lease() -> u32 {
    DEFAULT_LEASE_S
}

/// A fixed address for one MAC (libvirt's `<host mac= ip= name=>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostDef {
    pub mac: String,
    pub ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl NetworkDef {
    /// The daemon's first `default` network: `nat` on `bridge`/`address`
    /// with DHCP over the rest of the subnet (libvirt's .2 to .254).
    pub fn default_for(nat: &NatConfig) -> Self {
        let subnet = nat.address.network();
        let first = u32::from(subnet.addr);
        let last = first | u32::MAX.checked_shr(u32::from(subnet.prefix)).unwrap_or(0);
        NetworkDef {
            name: nat.name.clone(),
            bridge: nat.bridge.clone(),
            address: nat.address.to_string(),
            forward: Forward::Nat,
            dhcp: (last - first >= 4).then(|| DhcpDef {
                start: Ipv4Addr::from(first + 2),
                end: Ipv4Addr::from(last - 1),
                lease_seconds: DEFAULT_LEASE_S,
                dns: None,
                hosts: Vec::new(),
            }),
        }
    }

    /// Parses a definition; errors name `origin` and the line.
    pub fn parse(text: &str, origin: &str) -> Result<Self, NetworkError> {
        toml::from_str(text).map_err(|e| NetworkError::Parse {
            origin: origin.to_owned(),
            line: e
                .span()
                .map_or(1, |s| crate::config::line_of(text, s.start)),
            message: e.message().to_owned(),
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the definition: {e}\n"))
    }

    fn invalid(&self, field: &'static str, reason: impl Into<String>) -> NetworkError {
        NetworkError::Invalid {
            network: self.name.clone(),
            field,
            reason: reason.into(),
        }
    }

    /// Checks every field; `Ok` means the network can be started.
    pub fn validate(&self) -> Result<(), NetworkError> {
        check_name(&self.name).map_err(|r| self.invalid("name", r))?;
        check_ifname(&self.bridge).map_err(|r| self.invalid("bridge", r))?;
        let address = self.cidr()?;
        if address.prefix > 30 || address.addr == address.network().addr {
            return Err(self.invalid(
                "address",
                format!("{address}: give the bridge's own address in a network of /30 or wider"),
            ));
        }
        let Some(dhcp) = &self.dhcp else {
            return Ok(());
        };
        for host in &dhcp.hosts {
            parse_mac(&host.mac).ok_or_else(|| {
                self.invalid(
                    "dhcp.host.mac",
                    format!("{:?}: expected xx:xx:xx:xx:xx:xx", host.mac),
                )
            })?;
            if let Some(name) = &host.name {
                check_host_name(name).map_err(|r| self.invalid("dhcp.host.name", r))?;
            }
        }
        match self.dhcp_config(Path::new("/"), Vec::new())? {
            Some(config) => config
                .validate()
                .map_err(|e| self.invalid("dhcp", e.to_string())),
            None => Ok(()),
        }
    }

    pub fn cidr(&self) -> Result<Ipv4Cidr, NetworkError> {
        self.address
            .parse()
            .map_err(|e: host::net::NetError| self.invalid("address", e.to_string()))
    }

    /// The bridge, address and NAT table of the network.
    pub fn nat_config(&self) -> Result<NatConfig, NetworkError> {
        Ok(NatConfig {
            name: self.name.clone(),
            address: self.cidr()?,
            bridge: self.bridge.clone(),
            outgoing: None,
        })
    }

    /// The DHCP server's settings (`None` without a `[dhcp]` table);
    /// `host_dns` fills in unset name servers.
    pub fn dhcp_config(
        &self,
        leases_file: &Path,
        host_dns: Vec<Ipv4Addr>,
    ) -> Result<Option<DhcpConfig>, NetworkError> {
        let Some(dhcp) = &self.dhcp else {
            return Ok(None);
        };
        let address = self.cidr()?;
        let hosts = dhcp
            .hosts
            .iter()
            .map(|h| {
                Ok(StaticHost {
                    mac: parse_mac(&h.mac)
                        .ok_or_else(|| self.invalid("dhcp.host.mac", format!("{:?}", h.mac)))?,
                    ip: h.ip,
                    name: h.name.clone(),
                })
            })
            .collect::<Result<_, NetworkError>>()?;
        Ok(Some(DhcpConfig {
            interface: self.bridge.clone(),
            address,
            server: address.addr,
            range: (dhcp.start, dhcp.end),
            lease_time_s: dhcp.lease_seconds,
            dns: dhcp.dns.clone().unwrap_or(host_dns),
            hosts,
            leases_file: leases_file.to_owned(),
        }))
    }
}

/// Network names: they become nftables table and file names.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=MAX_NAME).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{name:?}: must be 1..{MAX_NAME} letters, digits or '_', starting with a letter or digit"
        )),
    }
}

/// Linux interface names: 1 to 15 bytes, no '/', ':' or whitespace.
fn check_ifname(name: &str) -> Result<(), String> {
    let ok = (1..=15).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '/' && c != ':');
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{name:?}: an interface name is 1 to 15 characters without '/', ':' or spaces"
        )),
    }
}

fn check_host_name(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{name:?}: a host name is 1 to 63 letters, digits, '-' or '.'"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "name = \"lab\"\nbridge = \"labbr0\"\naddress = \"10.5.0.1/24\"\n\n[dhcp]\nstart = \"10.5.0.10\"\nend = \"10.5.0.20\"\n\n[[dhcp.host]]\nmac = \"52:54:00:00:00:01\"\nip = \"10.5.0.5\"\nname = \"fixed\"\n";

    #[test]
    fn parses_checks_and_prints() {
        let def = NetworkDef::parse(EXAMPLE, "lab.toml").unwrap();
        def.validate().unwrap();
        assert_eq!(def.forward, Forward::Nat);
        let dhcp = def
            .dhcp_config(Path::new("/l"), vec![Ipv4Addr::new(1, 1, 1, 1)])
            .unwrap()
            .unwrap();
        assert_eq!(dhcp.lease_time_s, 3600);
        assert_eq!(dhcp.dns, [Ipv4Addr::new(1, 1, 1, 1)]);
        assert_eq!(dhcp.hosts[0].mac, [0x52, 0x54, 0, 0, 0, 1]);
        assert_eq!(NetworkDef::parse(&def.to_toml(), "again").unwrap(), def);
    }

    #[test]
    fn the_default_network_covers_the_subnet() {
        let def = NetworkDef::default_for(&NatConfig {
            name: "default".into(),
            address: "192.168.124.1/24".parse().unwrap(),
            bridge: "oxvirbr0".into(),
            outgoing: None,
        });
        def.validate().unwrap();
        let dhcp = def.dhcp.unwrap();
        assert_eq!(
            (dhcp.start, dhcp.end),
            (
                Ipv4Addr::new(192, 168, 124, 2),
                Ipv4Addr::new(192, 168, 124, 254)
            )
        );
    }

    #[test]
    fn errors_name_the_line_or_the_field() {
        let err = NetworkDef::parse("name = \"x\"\nbridge = 5\n", "net.toml").unwrap_err();
        assert!(err.to_string().starts_with("net.toml: line 2:"), "{err}");
        let err = NetworkDef::parse(&format!("{EXAMPLE}colour = \"red\"\n"), "n").unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
        let err = NetworkDef::parse(&EXAMPLE.replace("10.5.0.10", "10.5.0.300"), "n").unwrap_err();
        assert!(err.to_string().contains("line 6"), "{err}");
        let cases = [
            ("\"lab\"", "\"la b\"", "name"),
            ("labbr0", "averyveryverylongbridge", "bridge"),
            ("10.5.0.1/24", "10.5.0.0/24", "address"),
            ("10.5.0.1/24", "10.5.0.1", "address"),
            ("10.5.0.20", "10.6.0.20", "outside the network"),
            ("52:54:00:00:00:01", "52:54:00:00:01", "dhcp.host.mac"),
            ("\"fixed\"", "\"no way\"", "dhcp.host.name"),
            ("10.5.0.5", "10.5.0.1", "not a client address"),
        ];
        for (from, to, expected) in cases {
            let def = NetworkDef::parse(&EXAMPLE.replacen(from, to, 1), "n").unwrap();
            let err = def.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{from} -> {to}: {err}");
        }
    }
}
