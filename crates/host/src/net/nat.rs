//! NAT for a VM network: masquerading in an nftables table oxvirt owns
//! (`ip oxvirt_<network>`), replaced atomically and removed on teardown.

use super::command::run;
use super::{Ipv4Cidr, Links, NetError, NetNs};

/// One NATed network, like libvirt's `default` (192.168.122.0/24 on virbr0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatConfig {
    /// The network's name; the table is `oxvirt_<name>`.
    pub name: String,
    /// The bridge's address in the guests' network (`192.168.122.1/24`);
    /// the network part is what gets masqueraded.
    pub address: Ipv4Cidr,
    /// The bridge the guests are on.
    pub bridge: String,
    /// Masquerade only traffic leaving through this interface (any if `None`).
    pub outgoing: Option<String>,
}

/// An installed NAT table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nat {
    table: String,
    ns: Option<NetNs>,
}

impl Nat {
    /// Installs (or replaces) the network's table in `ns` (the host's
    /// namespace when `None`): guests' traffic to other networks is
    /// masqueraded, replies come back, and new connections into the
    /// guests' bridge from outside are dropped.
    pub fn apply(config: &NatConfig, ns: Option<&NetNs>) -> Result<Nat, NetError> {
        let table = table_name(&config.name)?;
        super::link::validate_ifname(&config.bridge)?;
        if let Some(out) = &config.outgoing {
            super::link::validate_ifname(out)?;
        }
        let nat = Nat {
            table,
            ns: ns.cloned(),
        };
        nat.nft(&["-f", "-"], Some(&nat.script(config)))?;
        tracing::info!(table = %nat.table, network = %config.address.network(), "installed NAT");
        Ok(nat)
    }

    /// The table `apply` installed for network `name` in `ns` earlier (by
    /// this process or another), to remove it.
    pub fn existing(name: &str, ns: Option<&NetNs>) -> Result<Nat, NetError> {
        Ok(Nat {
            table: table_name(name)?,
            ns: ns.cloned(),
        })
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// The table's rules as `nft list table` prints them.
    pub fn ruleset(&self) -> Result<String, NetError> {
        self.nft(&["list", "table", "ip", &self.table], None)
    }

    /// Removes the table.
    pub fn remove(&self) -> Result<(), NetError> {
        self.nft(&["delete", "table", "ip", &self.table], None)?;
        tracing::info!(table = %self.table, "removed NAT");
        Ok(())
    }

    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
        match &self.ns {
            Some(ns) => {
                let mut full = vec!["netns", "exec", ns.name(), "nft"];
                full.extend_from_slice(args);
                run("ip", &full, stdin)
            }
            None => run("nft", args, stdin),
        }
    }

    /// One transaction: create-if-missing, delete, then define, so an
    /// existing table is replaced whole or not at all.
    fn script(&self, c: &NatConfig) -> String {
        let net = c.address.network();
        let out = c
            .outgoing
            .as_ref()
            .map(|o| format!("oifname \"{o}\" "))
            .unwrap_or_default();
        let (t, br) = (&self.table, &c.bridge);
        format!(
            "table ip {t}\n\
             delete table ip {t}\n\
             table ip {t} {{\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {net} ip daddr != {net} {out}masquerade\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"{br}\" ip saddr {net} accept\n\
             \t\toifname \"{br}\" ct state established,related accept\n\
             \t\toifname \"{br}\" drop\n\
             \t}}\n\
             }}\n"
        )
    }
}

/// A NATed network: its bridge (with the gateway address), forwarding and
/// the NAT table, like libvirt's `default` network.
#[derive(Debug)]
pub struct NatNetwork {
    links: Links,
    bridge: String,
    nat: Nat,
}

impl NatNetwork {
    /// Creates the bridge, gives it `config.address`, turns IPv4
    /// forwarding on and installs the NAT table, in `ns` (the host's
    /// namespace when `None`). On failure what was made is removed again.
    pub fn start(config: &NatConfig, ns: Option<&NetNs>) -> Result<Self, NetError> {
        let links = ns.map_or_else(Links::host, Links::in_netns);
        links.add_bridge(&config.bridge)?;
        let network = NatNetwork {
            links,
            bridge: config.bridge.clone(),
            nat: Nat {
                table: table_name(&config.name)?,
                ns: ns.cloned(),
            },
        };
        let configured = network
            .links
            .add_address(&config.bridge, config.address)
            .and_then(|()| network.links.set_up(&config.bridge))
            .and_then(|()| set_ipv4_forwarding(ns, true))
            .and_then(|()| Nat::apply(config, ns));
        if let Err(e) = configured {
            if let Err(cleanup) = network.links.delete(&config.bridge) {
                tracing::warn!("removing bridge after a failed start: {cleanup}");
            }
            return Err(e);
        }
        Ok(network)
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    pub fn nat(&self) -> &Nat {
        &self.nat
    }

    /// Removes the NAT table and the bridge. Forwarding stays on: other
    /// networks may rely on it (libvirt leaves it on too).
    pub fn stop(self) -> Result<(), NetError> {
        self.nat.remove()?;
        self.links.delete(&self.bridge)
    }
}

/// Turns IPv4 forwarding on or off in `ns` (the host's when `None`).
pub fn set_ipv4_forwarding(ns: Option<&NetNs>, on: bool) -> Result<(), NetError> {
    let path = std::path::Path::new("/proc/sys/net/ipv4/ip_forward");
    let write = || {
        std::fs::write(path, if on { "1" } else { "0" }).map_err(|source| NetError::Write {
            path: path.to_owned(),
            source,
        })
    };
    match ns {
        Some(ns) => ns.run(write)?,
        None => write(),
    }
}

fn table_name(network: &str) -> Result<String, NetError> {
    let ok = !network.is_empty()
        && network.len() <= 48
        && network
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        return Err(NetError::BadName {
            kind: "network",
            name: network.to_owned(),
            reason: "use 1 to 48 letters, digits or '_'",
        });
    }
    Ok(format!("oxvirt_{network}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_masquerades_the_subnet() {
        let config = NatConfig {
            name: "default".into(),
            address: "192.168.122.1/24".parse().unwrap(),
            bridge: "virbr0".into(),
            outgoing: Some("eth0".into()),
        };
        let nat = Nat {
            table: table_name(&config.name).unwrap(),
            ns: None,
        };
        let script = nat.script(&config);
        assert!(script.starts_with("table ip oxvirt_default\ndelete table ip oxvirt_default\n"));
        assert!(script.contains(
            "ip saddr 192.168.122.0/24 ip daddr != 192.168.122.0/24 oifname \"eth0\" masquerade"
        ));
        assert!(script.contains("oifname \"virbr0\" drop"));
    }

    #[test]
    fn network_names_are_checked() {
        for bad in ["", "a b", "x;flush ruleset", &"n".repeat(49)] {
            let err = table_name(bad).unwrap_err();
            assert!(err.to_string().contains("network"), "{err}");
        }
    }
}
