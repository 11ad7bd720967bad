//! Virtual networks (libvirt's `net-*`): definitions under
//! `state/networks/NAME.toml`, each started as a bridge with the gateway
//! address, an nftables NAT table (`forward = "nat"`) and a DHCP server
//! on the bridge; and domains' NICs, one persistent tap each on their
//! network's bridge, which the VMM opens by name.
//!
//! A network is active while its bridge exists: a network outlives the
//! daemon (as libvirt leaves virbr0 up), and a restarted daemon finds it
//! and starts its DHCP server again with the leases from the lease file.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use host::net::dhcp::{format_mac, host_name_servers, unix_now, DhcpError, DhcpServer, LeaseTable};
use host::net::{Links, Nat, NatConfig, NatNetwork, NetError, Tap, TapConfig};
use serde::{Deserialize, Serialize};

use crate::config::{write_atomic, ConfigError};
use crate::devices::Nic;
use crate::error::ManagerError;
use crate::manager::remove_if_exists;
use crate::netdef::{Forward, NetworkDef};

/// Tap names the kernel numbers (`oxvnet0`, `oxvnet1`, ...).
const TAP_PATTERN: &str = "oxvnet%d";
/// The network a NIC without `network = ...` joins.
pub const DEFAULT_NETWORK: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network {network:?} not found")]
    NotFound { network: String },
    #[error("network {network:?} already exists")]
    Exists { network: String },
    #[error("network {network:?} is {state}: cannot {action}{hint}")]
    InvalidState {
        network: String,
        state: &'static str,
        action: &'static str,
        hint: &'static str,
    },
    #[error("{origin}: line {line}: {message}")]
    Parse {
        origin: String,
        line: usize,
        message: String,
    },
    #[error("network {network:?}: {field}: {reason}")]
    Invalid {
        network: String,
        field: &'static str,
        reason: String,
    },
    #[error("network {network:?}: {source}")]
    Host { network: String, source: NetError },
    #[error("network {network:?}: DHCP: {source}")]
    Dhcp { network: String, source: DhcpError },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl NetworkError {
    /// A stable, machine-readable error code (the domain errors' codes).
    pub fn code(&self) -> &'static str {
        match self {
            NetworkError::NotFound { .. } => "not_found",
            NetworkError::Exists { .. } => "exists",
            NetworkError::InvalidState { .. } => "invalid_state",
            NetworkError::Parse { .. } => "parse_error",
            NetworkError::Invalid { .. } => "invalid_argument",
            NetworkError::Host { .. } | NetworkError::Dhcp { .. } => "network_error",
            NetworkError::Config(_) | NetworkError::Io { .. } => "io_error",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            NetworkError::NotFound { .. } => 404,
            NetworkError::Exists { .. } | NetworkError::InvalidState { .. } => 409,
            NetworkError::Parse { .. } | NetworkError::Invalid { .. } => 400,
            _ => 500,
        }
    }

    pub fn field(&self) -> Option<&'static str> {
        match self {
            NetworkError::Invalid { field, .. } => Some(field),
            NetworkError::InvalidState { .. } => Some("state"),
            NetworkError::Exists { .. } => Some("name"),
            _ => None,
        }
    }
}

/// One line of `net-list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkSummary {
    pub name: String,
    pub active: bool,
    pub autostart: bool,
    pub persistent: bool,
    pub bridge: String,
}

/// `net-info`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkInfo {
    pub name: String,
    pub active: bool,
    pub autostart: bool,
    pub persistent: bool,
    pub bridge: String,
    pub address: String,
    pub forward: Forward,
    /// First and last DHCP address, when the network has DHCP.
    pub dhcp_range: Option<(Ipv4Addr, Ipv4Addr)>,
    /// The DHCP server of this daemon answers on the bridge.
    pub dhcp_running: bool,
}

/// One line of `net-dhcp-leases`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseInfo {
    /// Unix seconds.
    pub expiry: u64,
    pub mac: String,
    /// With the network's prefix, `192.168.124.5/24`.
    pub ip: String,
    pub hostname: Option<String>,
}

/// One NIC's addresses (`domifaddr`): from its network's DHCP leases.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InterfaceAddresses {
    /// The tap while the domain runs, else `netN`.
    pub name: String,
    pub mac: String,
    pub network: String,
    /// `A.B.C.D/NN` of each lease the MAC holds.
    pub addresses: Vec<String>,
}

/// Where a daemon keeps its networks.
#[derive(Debug, Clone)]
struct NetPaths {
    dir: PathBuf,
}

impl NetPaths {
    fn definition(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.toml"))
    }

    fn autostart(&self, name: &str) -> PathBuf {
        self.dir.join("autostart").join(name)
    }

    fn leases(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.leases"))
    }

    fn load(&self, name: &str) -> Result<(NetworkDef, String), NetworkError> {
        let path = self.definition(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(NetworkError::NotFound {
                    network: name.to_owned(),
                })
            }
            Err(source) => return Err(NetworkError::Io { path, source }),
        };
        let def = NetworkDef::parse(&text, &path.display().to_string())?;
        Ok((def, text))
    }

    /// Every definition that loads (others are logged and left out).
    fn all(&self) -> Vec<NetworkDef> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut defs: Vec<NetworkDef> = entries
            .flatten()
            .filter_map(|e| {
                let file = e.file_name().to_string_lossy().into_owned();
                let name = file.strip_suffix(".toml")?.to_owned();
                match self.load(&name) {
                    Ok((def, _)) => Some(def),
                    Err(e) => {
                        tracing::warn!(network = name, error = %e, "skipping a network definition");
                        None
                    }
                }
            })
            .collect();
        defs.sort_by(|a, b| a.name.cmp(&b.name));
        defs
    }
}

fn networks_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("networks")
}

fn is_active(def: &NetworkDef) -> Result<bool, NetworkError> {
    Links::host()
        .info(&def.bridge)
        .map(|info| info.is_some())
        .map_err(|source| NetworkError::Host {
            network: def.name.clone(),
            source,
        })
}

/// The daemon's networks and the DHCP servers it runs for them.
#[derive(Debug)]
pub(crate) struct Networks {
    paths: NetPaths,
    /// DHCP servers by network; the lock also serialises the net verbs.
    servers: Mutex<BTreeMap<String, DhcpServer>>,
}

impl Networks {
    /// Opens the daemon's networks. On the first start (no networks
    /// folder yet) `default` is defined from `default`, if given, and
    /// marked autostart, as libvirt installs its default network (a
    /// failure is logged: the daemon runs on without it).
    pub fn open(state_dir: &Path, default: Option<&NatConfig>) -> Self {
        let paths = NetPaths {
            dir: networks_dir(state_dir),
        };
        if let (false, Some(default)) = (paths.dir.exists(), default) {
            if let Err(e) = define_default(&paths, default) {
                tracing::warn!(error = %e, "cannot define the default network");
            }
        }
        Networks {
            paths,
            servers: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, DhcpServer>> {
        self.servers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// At daemon start: networks still up get their NAT re-applied (a
    /// flushed ruleset heals) and their DHCP server back; autostart ones
    /// that are down are started. Failures are logged: the daemon runs on.
    pub fn resume(&self) {
        let mut servers = self.lock();
        for def in self.paths.all() {
            let result = match is_active(&def) {
                Ok(true) => self.reattach(&def, &mut servers),
                Ok(false) if self.paths.autostart(&def.name).exists() => {
                    self.bring_up(&def, &mut servers)
                }
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                tracing::warn!(network = def.name, error = %e, "network not started");
            }
        }
    }

    fn reattach(
        &self,
        def: &NetworkDef,
        servers: &mut BTreeMap<String, DhcpServer>,
    ) -> Result<(), NetworkError> {
        if def.forward == Forward::Nat {
            Nat::apply(&def.nat_config()?, None).map_err(|source| NetworkError::Host {
                network: def.name.clone(),
                source,
            })?;
        }
        self.start_dhcp(def, servers)
    }

    fn start_dhcp(
        &self,
        def: &NetworkDef,
        servers: &mut BTreeMap<String, DhcpServer>,
    ) -> Result<(), NetworkError> {
        servers.remove(&def.name);
        let Some(config) = def.dhcp_config(&self.paths.leases(&def.name), host_name_servers())?
        else {
            return Ok(());
        };
        let server = DhcpServer::start(config, None).map_err(|source| NetworkError::Dhcp {
            network: def.name.clone(),
            source,
        })?;
        servers.insert(def.name.clone(), server);
        Ok(())
    }

    /// Bridge, address, NAT and DHCP; on failure what was made goes again.
    fn bring_up(
        &self,
        def: &NetworkDef,
        servers: &mut BTreeMap<String, DhcpServer>,
    ) -> Result<(), NetworkError> {
        let host = |source| NetworkError::Host {
            network: def.name.clone(),
            source,
        };
        let nat = def.nat_config()?;
        match def.forward {
            // The network outlives the daemon: not stopped when it stops.
            Forward::Nat => drop(NatNetwork::start(&nat, None).map_err(host)?),
            Forward::None => isolated_bridge(&nat).map_err(host)?,
        }
        if let Err(e) = self.start_dhcp(def, servers) {
            tear_down(def, servers);
            return Err(e);
        }
        tracing::info!(network = def.name, bridge = def.bridge, "network started");
        Ok(())
    }

    pub fn list(&self, all: bool) -> Result<Vec<NetworkSummary>, NetworkError> {
        let mut list = Vec::new();
        for def in self.paths.all() {
            let active = is_active(&def)?;
            if all || active {
                list.push(NetworkSummary {
                    autostart: self.paths.autostart(&def.name).exists(),
                    name: def.name,
                    active,
                    persistent: true,
                    bridge: def.bridge,
                });
            }
        }
        Ok(list)
    }

    pub fn info(&self, name: &str) -> Result<NetworkInfo, NetworkError> {
        let (def, _) = self.paths.load(name)?;
        Ok(NetworkInfo {
            active: is_active(&def)?,
            autostart: self.paths.autostart(name).exists(),
            persistent: true,
            dhcp_range: def.dhcp.as_ref().map(|d| (d.start, d.end)),
            dhcp_running: self.lock().contains_key(name),
            name: def.name,
            bridge: def.bridge,
            address: def.address,
            forward: def.forward,
        })
    }

    /// The definition as written (comments too).
    pub fn config_text(&self, name: &str) -> Result<String, NetworkError> {
        Ok(self.paths.load(name)?.1)
    }

    /// Checks and stores a new network; an existing name, or a bridge or
    /// subnet another network has, is refused and nothing is written.
    pub fn define(&self, text: &str, origin: &str) -> Result<NetworkInfo, NetworkError> {
        let def = NetworkDef::parse(text, origin)?;
        def.validate()?;
        {
            let _serial = self.lock();
            if self.paths.definition(&def.name).exists() {
                return Err(NetworkError::Exists { network: def.name });
            }
            self.check_clashes(&def)?;
            write_atomic(&self.paths.definition(&def.name), text.as_bytes())?;
        }
        tracing::info!(network = def.name, "network defined");
        self.info(&def.name)
    }

    fn check_clashes(&self, def: &NetworkDef) -> Result<(), NetworkError> {
        let subnet = def.cidr()?.network();
        for other in self.paths.all() {
            let other_subnet = other.cidr()?.network();
            let prefix = subnet.prefix.min(other_subnet.prefix);
            let overlap = |a: host::net::Ipv4Cidr| {
                host::net::Ipv4Cidr {
                    addr: a.addr,
                    prefix,
                }
                .network()
            };
            if other.bridge == def.bridge {
                return Err(def_invalid(
                    def,
                    "bridge",
                    format!("{} is network {:?}'s bridge", def.bridge, other.name),
                ));
            }
            if overlap(subnet) == overlap(other_subnet) {
                return Err(def_invalid(
                    def,
                    "address",
                    format!(
                        "{subnet} overlaps network {:?}'s {other_subnet}",
                        other.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Removes an inactive network's definition, autostart mark and leases.
    pub fn undefine(&self, name: &str) -> Result<(), NetworkError> {
        let _serial = self.lock();
        let (def, _) = self.paths.load(name)?;
        if is_active(&def)? {
            return Err(NetworkError::InvalidState {
                network: name.to_owned(),
                state: "active",
                action: "undefine",
                hint: " (net-destroy it first)",
            });
        }
        let path = self.paths.definition(name);
        std::fs::remove_file(&path).map_err(|source| NetworkError::Io { path, source })?;
        remove_if_exists(&self.paths.autostart(name));
        remove_if_exists(&self.paths.leases(name));
        tracing::info!(network = name, "network undefined");
        Ok(())
    }

    pub fn start(&self, name: &str) -> Result<NetworkInfo, NetworkError> {
        {
            let mut servers = self.lock();
            let (def, _) = self.paths.load(name)?;
            def.validate()?;
            if is_active(&def)? {
                return Err(NetworkError::InvalidState {
                    network: name.to_owned(),
                    state: "active",
                    action: "start",
                    hint: " (its bridge is up already)",
                });
            }
            self.bring_up(&def, &mut servers)?;
        }
        self.info(name)
    }

    /// Stops the DHCP server, removes the NAT table and the bridge. Taps
    /// of running domains stay, off any bridge, as with libvirt.
    pub fn destroy(&self, name: &str) -> Result<NetworkInfo, NetworkError> {
        {
            let mut servers = self.lock();
            let (def, _) = self.paths.load(name)?;
            if !is_active(&def)? {
                return Err(NetworkError::InvalidState {
                    network: name.to_owned(),
                    state: "inactive",
                    action: "destroy",
                    hint: "",
                });
            }
            if let Some(e) = tear_down(&def, &mut servers) {
                return Err(e);
            }
            tracing::info!(network = name, "network destroyed");
        }
        self.info(name)
    }

    pub fn set_autostart(&self, name: &str, enabled: bool) -> Result<NetworkInfo, NetworkError> {
        self.paths.load(name)?;
        mark_autostart(&self.paths.autostart(name), enabled)?;
        self.info(name)
    }

    /// The leases clients hold: the running server's, else the lease file's.
    pub fn leases(&self, name: &str) -> Result<Vec<LeaseInfo>, NetworkError> {
        let (def, _) = self.paths.load(name)?;
        let prefix = def.cidr()?.prefix;
        let leases = match self.lock().get(name) {
            Some(server) => server.leases(),
            None => LeaseTable::load(&self.paths.leases(name))
                .map_err(|source| NetworkError::Dhcp {
                    network: name.to_owned(),
                    source,
                })?
                .active(unix_now()),
        };
        Ok(leases
            .into_iter()
            .map(|l| LeaseInfo {
                expiry: l.expiry,
                mac: format_mac(&l.mac),
                ip: format!("{}/{prefix}", l.ip),
                hostname: l.hostname,
            })
            .collect())
    }
}

fn define_default(paths: &NetPaths, default: &NatConfig) -> Result<(), NetworkError> {
    let def = NetworkDef::default_for(default);
    def.validate()?;
    write_atomic(&paths.definition(&def.name), def.to_toml().as_bytes())?;
    mark_autostart(&paths.autostart(&def.name), true)?;
    tracing::info!(
        network = def.name,
        bridge = def.bridge,
        "defined the default network"
    );
    Ok(())
}

fn def_invalid(def: &NetworkDef, field: &'static str, reason: String) -> NetworkError {
    NetworkError::Invalid {
        network: def.name.clone(),
        field,
        reason,
    }
}

fn mark_autostart(mark: &Path, enabled: bool) -> Result<(), NetworkError> {
    if enabled {
        write_atomic(mark, b"")?;
    } else {
        remove_if_exists(mark);
    }
    Ok(())
}

/// A bridge with the address and no NAT (`forward = "none"`).
fn isolated_bridge(nat: &NatConfig) -> Result<(), NetError> {
    let links = Links::host();
    links.add_bridge(&nat.bridge)?;
    let configured = links
        .add_address(&nat.bridge, nat.address)
        .and_then(|()| links.set_up(&nat.bridge));
    if let Err(e) = configured {
        if let Err(cleanup) = links.delete(&nat.bridge) {
            tracing::warn!(bridge = nat.bridge, error = %cleanup, "cannot remove the bridge again");
        }
        return Err(e);
    }
    Ok(())
}

/// Undoes `bring_up` as far as it got; returns the first failure.
fn tear_down(def: &NetworkDef, servers: &mut BTreeMap<String, DhcpServer>) -> Option<NetworkError> {
    servers.remove(&def.name);
    let host = |source| NetworkError::Host {
        network: def.name.clone(),
        source,
    };
    let nat = match def.forward {
        Forward::Nat => Nat::existing(&def.name, None)
            .and_then(|nat| nat.remove())
            .err(),
        Forward::None => None,
    };
    let bridge = Links::host().delete(&def.bridge).err();
    nat.or(bridge).map(host)
}

/// Creates one tap per NIC on its network's bridge; on failure none is
/// left. Each network must be defined and active.
pub(crate) fn create_taps(
    state_dir: &Path,
    domain: &str,
    nics: &[Nic],
) -> Result<Vec<String>, ManagerError> {
    let paths = NetPaths {
        dir: networks_dir(state_dir),
    };
    let mut taps = Vec::with_capacity(nics.len());
    for nic in nics {
        match nic_bridge(&paths, domain, nic).and_then(|bridge| create_tap(domain, &bridge)) {
            Ok(name) => taps.push(name),
            Err(e) => {
                delete_taps(&taps);
                return Err(e);
            }
        }
    }
    Ok(taps)
}

fn nic_bridge(paths: &NetPaths, domain: &str, nic: &Nic) -> Result<String, ManagerError> {
    let network = nic.network.as_deref().unwrap_or(DEFAULT_NETWORK);
    let invalid = |reason: String| ManagerError::Invalid {
        domain: domain.to_owned(),
        field: "nic.network",
        reason,
    };
    let (def, _) = paths.load(network).map_err(|e| invalid(e.to_string()))?;
    match is_active(&def) {
        Ok(true) => Ok(def.bridge),
        Ok(false) => Err(invalid(format!(
            "network {network:?} is not active (start it: oxvirt net-start {network})"
        ))),
        Err(e) => Err(invalid(e.to_string())),
    }
}

fn create_tap(domain: &str, bridge: &str) -> Result<String, ManagerError> {
    let net = |source| ManagerError::Network {
        domain: domain.to_owned(),
        source,
    };
    let tap = Tap::create(&TapConfig {
        name: TAP_PATTERN,
        persistent: true,
        ..TapConfig::default()
    })
    .map_err(net)?;
    let name = tap.name().to_owned();
    // The persistent tap stays when our file closes; the VMM opens it.
    drop(tap);
    let links = Links::host();
    let attached = links
        .set_master(&name, bridge)
        .and_then(|()| links.set_up(&name));
    if let Err(e) = attached {
        delete_taps(std::slice::from_ref(&name));
        return Err(net(e));
    }
    Ok(name)
}

/// Deletes taps (a missing one is not an error: it is what we want).
pub(crate) fn delete_taps(taps: &[String]) {
    let links = Links::host();
    for tap in taps {
        match links.info(tap) {
            Ok(None) => {}
            _ => {
                if let Err(e) = links.delete(tap) {
                    tracing::warn!(tap, error = %e, "cannot delete tap");
                }
            }
        }
    }
}
