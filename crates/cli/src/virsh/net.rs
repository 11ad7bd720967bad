//! virsh's network verbs (`net-list`, `net-start`, `net-dhcp-leases`, ...):
//! each one API call, printed as virsh prints it.

use std::path::PathBuf;

use anyhow::Context;
use daemon::network::{InterfaceAddresses, LeaseInfo, NetworkInfo, NetworkSummary};

use super::print::utc_time;
use super::{wait, Connect, Dom};

/// The network a verb acts on: `NET` or virsh's `--network NET`.
#[derive(clap::Args)]
pub struct Net {
    #[command(flatten)]
    connect: Connect,
    /// Network name.
    #[arg(
        required_unless_present = "network_flag",
        conflicts_with = "network_flag"
    )]
    network: Option<String>,
    /// Network name (virsh's spelling).
    #[arg(long = "network", id = "network_flag", value_name = "NETWORK")]
    network_flag: Option<String>,
}

impl Net {
    fn name(&self) -> &str {
        // clap makes sure one of the two is there.
        self.network
            .as_deref()
            .or(self.network_flag.as_deref())
            .unwrap_or_default()
    }
}

#[derive(clap::Args)]
pub struct NetListArgs {
    #[command(flatten)]
    connect: Connect,
    /// Inactive networks too.
    #[arg(long)]
    all: bool,
    /// Names only.
    #[arg(long)]
    name: bool,
}

#[derive(clap::Args)]
pub struct NetDefineArgs {
    #[command(flatten)]
    connect: Connect,
    /// The network's TOML definition.
    #[arg(required_unless_present = "file_flag", conflicts_with = "file_flag")]
    file: Option<PathBuf>,
    /// The definition (virsh's spelling).
    #[arg(long = "file", id = "file_flag", value_name = "FILE")]
    file_flag: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct NetAutostartArgs {
    #[command(flatten)]
    net: Net,
    /// Stop starting it with the daemon.
    #[arg(long)]
    disable: bool,
}

#[derive(clap::Args)]
pub struct NetLeasesArgs {
    #[command(flatten)]
    net: Net,
    /// Only this client's lease.
    #[arg(long)]
    mac: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum NetVerb {
    /// List active networks (with --all, every defined one).
    #[command(name = "net-list")]
    List(NetListArgs),
    /// A network's state, bridge, address and DHCP range.
    #[command(name = "net-info")]
    Info(Net),
    /// Print a network's TOML definition.
    #[command(name = "net-dumpconfig", alias = "net-dumpxml")]
    Dumpconfig(Net),
    /// Define a network from a TOML file.
    #[command(name = "net-define")]
    Define(NetDefineArgs),
    /// Remove an inactive network's definition.
    #[command(name = "net-undefine")]
    Undefine(Net),
    /// Start a network: bridge, NAT, DHCP.
    #[command(name = "net-start")]
    Start(Net),
    /// Stop a network (its bridge, NAT and DHCP go).
    #[command(name = "net-destroy")]
    Destroy(Net),
    /// Start a network when the daemon starts.
    #[command(name = "net-autostart")]
    Autostart(NetAutostartArgs),
    /// The addresses the network's DHCP server handed out.
    /// A domain's NICs and the addresses DHCP leased them.
    #[command(name = "domifaddr")]
    Domifaddr(Dom),
    #[command(name = "net-dhcp-leases")]
    DhcpLeases(NetLeasesArgs),
}

pub fn run(verb: NetVerb) -> anyhow::Result<()> {
    match verb {
        NetVerb::List(a) => list(&wait(a.connect.client()?.net_list(a.all))?, a.name),
        NetVerb::Info(n) => info(&wait(n.connect.client()?.net_info(n.name()))?),
        NetVerb::Dumpconfig(n) => {
            print!("{}", wait(n.connect.client()?.net_config(n.name()))?)
        }
        NetVerb::Define(a) => {
            let file = a.file.or(a.file_flag).unwrap_or_default();
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let origin = file.display().to_string();
            let info = wait(a.connect.client()?.net_define(&text, &origin))?;
            println!("Network {} defined from {origin}", info.name);
        }
        NetVerb::Undefine(n) => {
            wait(n.connect.client()?.net_undefine(n.name()))?;
            println!("Network {} has been undefined", n.name());
        }
        NetVerb::Start(n) => {
            wait(n.connect.client()?.net_start(n.name()))?;
            println!("Network {} started", n.name());
        }
        NetVerb::Destroy(n) => {
            wait(n.connect.client()?.net_destroy(n.name()))?;
            println!("Network {} destroyed", n.name());
        }
        NetVerb::Autostart(a) => {
            let client = a.net.connect.client()?;
            wait(client.net_autostart(a.net.name(), !a.disable))?;
            match a.disable {
                false => println!("Network {} marked as autostarted", a.net.name()),
                true => println!("Network {} unmarked as autostarted", a.net.name()),
            }
        }
        NetVerb::DhcpLeases(a) => {
            let mut leases = wait(a.net.connect.client()?.net_leases(a.net.name()))?;
            if let Some(mac) = &a.mac {
                leases.retain(|l| l.mac.eq_ignore_ascii_case(mac));
            }
            print_leases(&leases);
        }
        NetVerb::Domifaddr(d) => print_addresses(&wait(d.connect.client()?.domifaddr(&d.domain))?),
    }
    Ok(())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn list(networks: &[NetworkSummary], names_only: bool) {
    if names_only {
        for n in networks {
            println!("{}", n.name);
        }
        return;
    }
    println!(
        " {:<20} {:<10} {:<11} Persistent",
        "Name", "State", "Autostart"
    );
    println!("{}", "-".repeat(55));
    for n in networks {
        let state = if n.active { "active" } else { "inactive" };
        println!(
            " {:<20} {state:<10} {:<11} {}",
            n.name,
            yes_no(n.autostart),
            yes_no(n.persistent)
        );
    }
}

fn info(i: &NetworkInfo) {
    println!("{:<16}{}", "Name:", i.name);
    println!("{:<16}{}", "Active:", yes_no(i.active));
    println!("{:<16}{}", "Persistent:", yes_no(i.persistent));
    println!("{:<16}{}", "Autostart:", yes_no(i.autostart));
    println!("{:<16}{}", "Bridge:", i.bridge);
    println!("{:<16}{}", "Address:", i.address);
    println!("{:<16}{}", "Forward:", i.forward);
    match i.dhcp_range {
        Some((start, end)) => println!("{:<16}{start} - {end}", "DHCP range:"),
        None => println!("{:<16}none", "DHCP range:"),
    }
    println!(
        "{:<16}{}",
        "DHCP server:",
        if i.dhcp_running { "running" } else { "stopped" }
    );
}

fn print_leases(leases: &[LeaseInfo]) {
    println!(
        " {:<21} {:<19} {:<10} {:<20} {:<12} Client ID or DUID",
        "Expiry Time", "MAC address", "Protocol", "IP address", "Hostname"
    );
    println!("{}", "-".repeat(105));
    for l in leases {
        println!(
            " {:<21} {:<19} {:<10} {:<20} {:<12} -",
            utc_time(l.expiry),
            l.mac,
            "ipv4",
            l.ip,
            l.hostname.as_deref().unwrap_or("-")
        );
    }
}

fn print_addresses(nics: &[InterfaceAddresses]) {
    println!(
        " {:<10} {:<20} {:<12} Address",
        "Name", "MAC address", "Protocol"
    );
    println!("{}", "-".repeat(64));
    for nic in nics {
        if nic.addresses.is_empty() {
            println!(" {:<10} {:<20} {:<12} -", nic.name, nic.mac, "-");
        }
        for address in &nic.addresses {
            println!(" {:<10} {:<20} {:<12} {address}", nic.name, nic.mac, "ipv4");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::utc_time;

    #[test]
    fn lease_expiry_prints_as_utc() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_time(1_795_412_409), "2026-11-23 05:40:09");
    }
}
