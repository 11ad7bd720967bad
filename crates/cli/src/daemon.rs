//! `oxvirt daemon` (installed as oxvirtd): the manager, in system mode as
//! root or session mode for a user (see docs/manager.md).

use std::path::PathBuf;

use anyhow::Context;
use daemon::paths::{Mode, Paths};
use daemon::remote::RemoteListen;
use daemon::server::{self, DaemonOptions};

#[derive(clap::Args)]
pub struct Args {
    /// System instance (/var/lib/oxvirt, /run/oxvirt); the default for root.
    #[arg(long, conflicts_with = "session")]
    system: bool,
    /// Session instance ($XDG_STATE_HOME/oxvirt, $XDG_RUNTIME_DIR/oxvirt).
    #[arg(long)]
    session: bool,
    /// Definitions, logs and autostart marks (overrides $OXVIRT_STATE_DIR).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The API socket and running domains' sockets (overrides $OXVIRT_RUN_DIR).
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// The oxvirt binary that runs `vmm` (default: this executable).
    #[arg(long, value_name = "FILE")]
    vmm_binary: Option<PathBuf>,
    /// Run domains without cgroups (no resource limits).
    #[arg(long)]
    no_cgroups: bool,
    /// Parent cgroup of all domains (default: oxvirt).
    #[arg(long, value_name = "PATH")]
    cgroup_parent: Option<PathBuf>,
    /// The bridge of the `default` network when the first start defines it (default: oxvirbr0).
    #[arg(long, value_name = "NAME")]
    network_bridge: Option<String>,
    /// The bridge's address and prefix (default: 192.168.124.1/24).
    #[arg(long, value_name = "CIDR")]
    network_address: Option<String>,
    /// Do not define the `default` network on the first start.
    #[arg(long, conflicts_with_all = ["network_bridge", "network_address"])]
    no_default_network: bool,
    /// Also serve the API on TCP for other hosts, e.g. tcp:0.0.0.0:16509
    /// (no TLS: trusted networks only; every request needs the token).
    #[arg(long, value_name = "tcp:ADDR:PORT")]
    listen: Option<String>,
    /// The remote API's secret, made by the admin, mode 0600 (default: STATE/remote.token).
    #[arg(long, value_name = "FILE", requires = "listen")]
    token_file: Option<PathBuf>,
    /// Serve --listen inside TLS with this certificate chain (PEM); clients use oxvirt+tls://.
    #[arg(long, value_name = "FILE", requires_all = ["listen", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("OXVIRT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Another subcommand may have installed a subscriber already; keep it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let mode = match (args.system, args.session) {
        (true, _) => Mode::System,
        (_, true) => Mode::Session,
        _ => Mode::for_current_user(),
    };
    let mut paths = Paths::for_mode(mode)?;
    if let Some(dir) = args.state_dir {
        paths.state_dir = dir;
    }
    if let Some(dir) = args.run_dir {
        paths.run_dir = dir;
    }
    // The VMMs and the logs the daemon reports must not depend on its cwd.
    paths.state_dir = std::path::absolute(&paths.state_dir).context("state folder")?;
    paths.run_dir = std::path::absolute(&paths.run_dir).context("runtime folder")?;
    let vmm_binary = match args.vmm_binary {
        Some(path) => path,
        None => std::env::current_exe().context("finding the oxvirt executable for `vmm`")?,
    };
    let root = Mode::for_current_user() == Mode::System;
    if !args.no_cgroups && !root {
        eprintln!("oxvirt daemon: not root: running domains without cgroups");
    }
    let mut network = server::default_network();
    if let Some(bridge) = args.network_bridge {
        network.bridge = bridge;
    }
    if let Some(address) = args.network_address {
        network.address = address
            .parse()
            .with_context(|| format!("--network-address {address}"))?;
    }
    // A user cannot make bridges or NAT rules: a session daemon starts
    // without a default network, as libvirt's qemu:///session does.
    let network = (!args.no_default_network && mode == Mode::System).then_some(network);
    let remote = match args.listen {
        Some(listen) => Some(RemoteListen {
            addr: daemon::remote::parse_listen(&listen)?,
            token_file: match args.token_file {
                Some(file) => std::path::absolute(file).context("token file")?,
                None => RemoteListen::default_token_file(&paths),
            },
            tls: args.tls_cert.zip(args.tls_key),
        }),
        None => None,
    };
    server::run_blocking(DaemonOptions {
        remote,
        network,
        // As the default network: a system daemon's, at STATE/images.
        default_pool: mode == Mode::System,
        paths,
        vmm_binary,
        cgroups: root && !args.no_cgroups,
        cgroup_parent: args.cgroup_parent,
    })?;
    Ok(0)
}
