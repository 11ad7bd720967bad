//! Links (bridges, veth pairs, taps), addresses and routes via `ip`.

use std::net::Ipv4Addr;

use serde_json::Value;

use super::command::run;
use super::{Ipv4Cidr, NetError, NetNs};

/// The kernel's limit on interface names (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// What `ip -d addr show` says about one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    /// `bridge`, `veth`, `tun`, ...; `None` for physical devices and `lo`.
    pub kind: Option<String>,
    /// Administratively up.
    pub up: bool,
    /// The bridge it is a port of.
    pub master: Option<String>,
    pub addresses: Vec<Ipv4Cidr>,
    /// For tap devices: whether they take a virtio-net header, whether
    /// they outlive their file, and their owner's uid.
    pub vnet_hdr: Option<bool>,
    pub persistent: Option<bool>,
    pub owner: Option<u32>,
}

/// Link operations in the host's namespace or in a named one.
#[derive(Debug, Clone, Default)]
pub struct Links {
    ns: Option<NetNs>,
}

impl Links {
    pub fn host() -> Self {
        Links { ns: None }
    }

    pub fn in_netns(ns: &NetNs) -> Self {
        Links {
            ns: Some(ns.clone()),
        }
    }

    fn ip(&self, args: &[&str]) -> Result<String, NetError> {
        match &self.ns {
            Some(ns) => {
                let mut full = vec!["-n", ns.name()];
                full.extend_from_slice(args);
                run("ip", &full, None)
            }
            None => run("ip", args, None),
        }
    }

    pub fn add_bridge(&self, name: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        self.ip(&["link", "add", name, "type", "bridge"])?;
        Ok(())
    }

    /// Creates a veth pair `name` <-> `peer`, both here.
    pub fn add_veth(&self, name: &str, peer: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        validate_ifname(peer)?;
        self.ip(&["link", "add", name, "type", "veth", "peer", "name", peer])?;
        Ok(())
    }

    /// Moves a link into another namespace (it goes down on the way).
    pub fn move_to(&self, name: &str, target: &NetNs) -> Result<(), NetError> {
        validate_ifname(name)?;
        self.ip(&["link", "set", "dev", name, "netns", target.name()])?;
        Ok(())
    }

    pub fn set_up(&self, name: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        self.ip(&["link", "set", "dev", name, "up"])?;
        Ok(())
    }

    pub fn set_down(&self, name: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        self.ip(&["link", "set", "dev", name, "down"])?;
        Ok(())
    }

    /// Makes `name` a port of `bridge`.
    pub fn set_master(&self, name: &str, bridge: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        validate_ifname(bridge)?;
        self.ip(&["link", "set", "dev", name, "master", bridge])?;
        Ok(())
    }

    pub fn remove_master(&self, name: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        self.ip(&["link", "set", "dev", name, "nomaster"])?;
        Ok(())
    }

    pub fn add_address(&self, name: &str, addr: Ipv4Cidr) -> Result<(), NetError> {
        validate_ifname(name)?;
        self.ip(&["addr", "add", &addr.to_string(), "dev", name])?;
        Ok(())
    }

    /// Adds a route to `dest` (`None`: the default route) via `gateway`.
    pub fn add_route(&self, dest: Option<Ipv4Cidr>, gateway: Ipv4Addr) -> Result<(), NetError> {
        let dest = dest.map_or_else(|| "default".to_owned(), |d| d.network().to_string());
        self.ip(&["route", "add", &dest, "via", &gateway.to_string()])?;
        Ok(())
    }

    pub fn delete(&self, name: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        self.ip(&["link", "delete", "dev", name])?;
        Ok(())
    }

    /// The link's state, or `None` when there is no such link.
    pub fn info(&self, name: &str) -> Result<Option<LinkInfo>, NetError> {
        validate_ifname(name)?;
        let args = ["-j", "-d", "addr", "show", "dev", name];
        let json = match self.ip(&args) {
            Ok(json) => json,
            Err(NetError::Command { stderr, .. }) if stderr.contains("does not exist") => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let parse_error = |reason: String| NetError::Parse {
            command: format!("ip {}", args.join(" ")),
            reason,
        };
        let value: Value = serde_json::from_str(&json).map_err(|e| parse_error(e.to_string()))?;
        let link = value
            .get(0)
            .ok_or_else(|| parse_error("an empty list".to_owned()))?;
        parse_link(link).map(Some).map_err(parse_error)
    }

    /// Names of the links in the namespace.
    pub fn names(&self) -> Result<Vec<String>, NetError> {
        let json = self.ip(&["-j", "link", "show"])?;
        let value: Value = serde_json::from_str(&json).map_err(|e| NetError::Parse {
            command: "ip -j link show".to_owned(),
            reason: e.to_string(),
        })?;
        Ok(value
            .as_array()
            .map(|links| {
                links
                    .iter()
                    .filter_map(|l| Some(l.get("ifname")?.as_str()?.to_owned()))
                    .collect()
            })
            .unwrap_or_default())
    }
}

fn parse_link(link: &Value) -> Result<LinkInfo, String> {
    let name = link
        .get("ifname")
        .and_then(Value::as_str)
        .ok_or("no ifname")?
        .to_owned();
    let flags = link.get("flags").and_then(Value::as_array);
    let up = flags.is_some_and(|f| f.iter().any(|x| x.as_str() == Some("UP")));
    let info = link.get("linkinfo");
    let kind = info
        .and_then(|i| i.get("info_kind"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let data = info.and_then(|i| i.get("info_data"));
    let flag = |key: &str| data.and_then(|d| d.get(key)).and_then(Value::as_bool);
    let addresses = link
        .get("addr_info")
        .and_then(Value::as_array)
        .map(|addrs| {
            addrs
                .iter()
                .filter(|a| a.get("family").and_then(Value::as_str) == Some("inet"))
                .filter_map(|a| {
                    let local = a.get("local")?.as_str()?.parse().ok()?;
                    let prefix = u8::try_from(a.get("prefixlen")?.as_u64()?).ok()?;
                    Ipv4Cidr::new(local, prefix).ok()
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(LinkInfo {
        name,
        kind,
        up,
        master: link
            .get("master")
            .and_then(Value::as_str)
            .map(str::to_owned),
        addresses,
        vnet_hdr: flag("vnet_hdr"),
        persistent: flag("persist"),
        owner: data.and_then(|d| d.get("user")).and_then(user_id),
    })
}

/// `ip` prints a tap's owner as a user name where one exists.
fn user_id(user: &Value) -> Option<u32> {
    if let Some(n) = user.as_u64() {
        return u32::try_from(n).ok();
    }
    let name = user.as_str()?;
    name.parse().ok().or_else(|| {
        nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .map(|u| u.uid.as_raw())
    })
}

/// Interface names: 1 to 15 bytes, no '/', ':', whitespace or NUL.
pub(super) fn validate_ifname(name: &str) -> Result<(), NetError> {
    let bad = |reason| NetError::BadName {
        kind: "interface",
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name == "." || name == ".." {
        return Err(bad("it is empty, . or .."));
    }
    if name.len() > MAX_IFNAME {
        return Err(bad("it is longer than 15 bytes"));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
    {
        return Err(bad("it contains '/', ':', whitespace or NUL"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_json() {
        let json: Value = serde_json::from_str(
            r#"[{"ifname":"tp0","flags":["BROADCAST","UP"],"master":"br0",
            "linkinfo":{"info_kind":"tun","info_data":{"type":"tap","vnet_hdr":true,"persist":true,"user":"1000"}},
            "addr_info":[{"family":"inet","local":"10.9.0.1","prefixlen":24},{"family":"inet6","local":"fe80::1","prefixlen":64}]}]"#,
        )
        .unwrap();
        let info = parse_link(&json[0]).unwrap();
        assert_eq!(info.name, "tp0");
        assert!(info.up);
        assert_eq!(info.kind.as_deref(), Some("tun"));
        assert_eq!(info.master.as_deref(), Some("br0"));
        assert_eq!(info.addresses, vec!["10.9.0.1/24".parse().unwrap()]);
        assert_eq!(
            (info.vnet_hdr, info.persistent, info.owner),
            (Some(true), Some(true), Some(1000))
        );
        assert!(parse_link(&serde_json::json!({})).is_err());
    }

    #[test]
    fn interface_names_are_checked() {
        for bad in ["", "sixteen-bytes-xx", "a/b", "a b", "eth0:1"] {
            let err = validate_ifname(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        assert!(validate_ifname("fifteen-bytes-x").is_ok());
    }
}
