//! `oxvirt daemon`: the manager behind its API socket until SIGTERM or
//! SIGINT. Stopping the daemon leaves running VMs running.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use host::cgroup::{CgroupError, Layout, ParentGroup};
use host::net::{Ipv4Cidr, NatConfig};
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};

use crate::error::ManagerError;
use crate::manager::{CgroupPlacement, Manager, ManagerOptions};
use crate::paths::Paths;
use crate::remote::{RemoteError, RemoteListen};

/// Errors starting or running the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("another oxvirtd already listens on {0}")]
    AlreadyRunning(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroups: {0}")]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Manager(#[from] ManagerError),
    #[error("remote API: {0}")]
    Remote(#[from] RemoteError),
}

/// The daemon's settings.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub paths: Paths,
    pub vmm_binary: PathBuf,
    /// Put domains into cgroups (needs root).
    pub cgroups: bool,
    /// The parent group of all domains (default `oxvirt`).
    pub cgroup_parent: Option<PathBuf>,
    /// The `default` network the first start defines (`None`: none).
    pub network: Option<NatConfig>,
    /// Define the `default` storage pool (at STATE/images) on the first start.
    pub default_pool: bool,
    /// The remote API on TCP (`--listen`), if any.
    pub remote: Option<RemoteListen>,
}

/// The `default` network unless told otherwise: like libvirt's, on a
/// bridge and subnet of its own so both can run on one host.
pub fn default_network() -> NatConfig {
    NatConfig {
        name: "default".into(),
        address: Ipv4Cidr::new(std::net::Ipv4Addr::new(192, 168, 124, 1), 24)
            .expect("a /24 is a valid prefix"),
        bridge: "oxvirbr0".into(),
        outgoing: None,
    }
}

impl DaemonOptions {
    fn manager_options(&self) -> Result<ManagerOptions, DaemonError> {
        let cgroups = if self.cgroups {
            let layout = Layout::detect()?;
            let parent = match &self.cgroup_parent {
                Some(path) => ParentGroup::placed_for(&layout, path.clone()),
                None => ParentGroup::default_for(&layout),
            };
            Some(CgroupPlacement { layout, parent })
        } else {
            None
        };
        Ok(ManagerOptions {
            paths: self.paths.clone(),
            vmm_binary: self.vmm_binary.clone(),
            cgroups,
            network: self.network.clone(),
            default_pool: self.default_pool,
        })
    }
}

/// Serves the API until a termination signal.
pub async fn serve(opts: DaemonOptions) -> Result<(), DaemonError> {
    let socket = opts.paths.socket();
    let io = |path: &PathBuf| {
        let path = path.clone();
        move |source| DaemonError::Io { path, source }
    };
    std::fs::create_dir_all(&opts.paths.run_dir).map_err(io(&opts.paths.run_dir))?;
    if tokio::net::UnixStream::connect(&socket).await.is_ok() {
        return Err(DaemonError::AlreadyRunning(socket));
    }
    let remote = match &opts.remote {
        Some(listen) => Some(listen.bind(&opts.paths).await?),
        None => None,
    };
    let manager = Manager::open(opts.manager_options()?).await?;
    // A socket file nobody answers on is a leftover of a killed daemon.
    crate::manager::remove_if_exists(&socket);
    let listener = UnixListener::bind(&socket).map_err(io(&socket))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io(&socket))?;
    tracing::info!(socket = %socket.display(), "oxvirtd listening");
    let api = crate::api::router(manager);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        terminated().await;
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        // An error means the sender is gone, which is a stop too.
        let _ = rx.wait_for(|s| *s).await;
    };
    let tcp = async {
        let Some(r) = remote else { return Ok(()) };
        let router = crate::remote::router(api.clone(), r.token, r.addr);
        let served = match r.tls {
            Some(acceptor) => {
                let listener = crate::remote::TlsListener::new(r.listener, acceptor, r.addr);
                axum::serve(listener, router)
                    .with_graceful_shutdown(until_stopped(stopped.clone()))
                    .await
            }
            None => {
                axum::serve(r.listener, router)
                    .with_graceful_shutdown(until_stopped(stopped.clone()))
                    .await
            }
        };
        served.map_err(io(&crate::remote::listen_file(&opts.paths)))
    };
    let unix = async {
        axum::serve(listener, api.clone())
            .with_graceful_shutdown(until_stopped(stopped.clone()))
            .await
    };
    let (unix, tcp) = tokio::join!(unix, tcp);
    let result = unix.map_err(io(&socket)).and(tcp);
    crate::manager::remove_if_exists(&socket);
    crate::manager::remove_if_exists(&crate::remote::listen_file(&opts.paths));
    tracing::info!("oxvirtd stopped; running domains keep running");
    result
}

async fn terminated() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot watch for SIGTERM/SIGINT; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Runs the daemon on a runtime of its own until a termination signal.
pub fn run_blocking(opts: DaemonOptions) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| DaemonError::Io {
            path: PathBuf::from("tokio runtime"),
            source,
        })?;
    runtime.block_on(serve(opts))
}
