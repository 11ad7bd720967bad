//! The running balancer: listeners that survive reloads, one generation of
//! configuration per reload, sessions tracked for graceful stop, signals.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{LogError, LogFile, LogFiles};
use crate::balancer::Upstream;
use crate::config::{Config, ConfigError, ListenConf, Method, ServerConf};
use crate::limits::Zone;
use crate::uring::Engine;
use crate::vars::Template;
use crate::{api, health, tcp, udp};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("cannot listen on {addr}{}: {source}", if *.udp { " udp" } else { "" })]
    Listen {
        addr: SocketAddr,
        udp: bool,
        source: std::io::Error,
    },
    #[error("runtime API: {0}")]
    Api(std::io::Error),
    #[error("cannot write pid file {path}: {source}")]
    Pid {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Counters that are not per upstream peer.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub denied: AtomicU64,
    pub limited: AtomicU64,
    pub proxy_protocol_errors: AtomicU64,
    pub over_capacity: AtomicU64,
    pub reloads: AtomicU64,
}

/// Everything a server block needs at session time.
#[derive(Debug)]
pub struct ServerCtx {
    pub conf: ServerConf,
    pub upstream: Arc<Upstream>,
    pub hash_key: Option<Template>,
    pub logs: Vec<(Arc<LogFile>, Template)>,
    pub limits: Vec<(Arc<Zone>, u32)>,
}

/// One loaded configuration. Sessions keep the generation they started in.
#[derive(Debug)]
pub struct Generation {
    pub config: Config,
    pub upstreams: Vec<Arc<Upstream>>,
    pub servers: Vec<Arc<ServerCtx>>,
    /// Stops this generation's health checks when a reload replaces it.
    retired: CancellationToken,
}

/// State that lives across reloads.
pub struct Shared {
    pub sessions: TaskTracker,
    /// Cancelled on a fast stop (SIGTERM): open sessions end now.
    pub kill: CancellationToken,
    pub stats: Stats,
    next_conn: AtomicU64,
    zones: Mutex<HashMap<String, Arc<Zone>>>,
    current: RwLock<Arc<Generation>>,
    capacity: Option<Arc<Semaphore>>,
}

impl Shared {
    pub fn next_connection(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A slot under `worker_connections` (TCP sessions and UDP sessions
    /// alike); `Err` when all are taken, `Ok(None)` when there is no limit.
    pub(crate) fn session_slot(&self) -> Result<Option<OwnedSemaphorePermit>, ()> {
        match &self.capacity {
            Some(sem) => sem.clone().try_acquire_owned().map(Some).map_err(|_| {
                self.stats.over_capacity.fetch_add(1, Ordering::Relaxed);
            }),
            None => Ok(None),
        }
    }

    pub fn current(&self) -> Arc<Generation> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What a listener serves: the server block and its `listen` line; `None` closes it.
pub type ListenValue = Option<(Arc<ServerCtx>, ListenConf)>;

/// A bound socket and the channel that tells its loop which server it serves.
struct ListenerHandle {
    serve: watch::Sender<ListenValue>,
}

/// The balancer inside a tokio runtime.
pub struct Balancer {
    shared: Arc<Shared>,
    /// TCP sessions on io_uring; `None`: on tokio's epoll reactor.
    engine: Option<Engine>,
    listeners: HashMap<(SocketAddr, bool), ListenerHandle>,
    api_stop: CancellationToken,
}

/// Builds the state for `config`; upstreams of `previous` with the same name
/// hand over their unchanged servers (health, counters, API changes).
fn build_generation(
    config: Config,
    shared_zones: &Mutex<HashMap<String, Arc<Zone>>>,
    previous: Option<&Generation>,
) -> Result<Generation, RunError> {
    let upstreams: Vec<Arc<Upstream>> = config
        .upstreams
        .iter()
        .map(|u| {
            let old = previous.and_then(|g| g.upstreams.iter().find(|o| o.name == u.name));
            Arc::new(Upstream::new(u, old.map(|o| &**o)))
        })
        .collect();
    let mut files = LogFiles::default();
    let zones = {
        let mut zones = shared_zones.lock().unwrap_or_else(|e| e.into_inner());
        for (name, key) in &config.limit_zones {
            let keep = zones.get(name).is_some_and(|z| &z.key == key);
            if !keep {
                zones.insert(name.clone(), Arc::new(Zone::new(name, key.clone())));
            }
        }
        zones.clone()
    };
    let mut servers = Vec::new();
    for conf in &config.servers {
        let upstream = upstreams[conf.upstream].clone();
        let hash_key = match upstream.method() {
            Method::Hash { key, .. } => Some(key.clone()),
            _ => None,
        };
        let mut logs = Vec::new();
        for log in &conf.proxy.access_log {
            logs.push((files.get(&log.path)?, log.format.clone()));
        }
        // The config checked that every limit_conn names a defined zone.
        let limits = conf
            .proxy
            .limit_conn
            .iter()
            .filter_map(|(name, n)| zones.get(name).map(|z| (z.clone(), *n)))
            .collect();
        servers.push(Arc::new(ServerCtx {
            conf: conf.clone(),
            upstream,
            hash_key,
            logs,
            limits,
        }));
    }
    Ok(Generation {
        config,
        upstreams,
        servers,
        retired: CancellationToken::new(),
    })
}

fn bind_tcp(l: &ListenConf) -> Result<std::net::TcpListener, RunError> {
    let err = |source| RunError::Listen {
        addr: l.addr,
        udp: false,
        source,
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(l.addr),
        socket2::Type::STREAM,
        None,
    )
    .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    // Accepted sockets inherit TCP_NODELAY: one setsockopt per listener, not per session.
    socket.set_nodelay(true).map_err(err)?;
    if l.reuseport {
        socket.set_reuse_port(true).map_err(err)?;
    }
    if l.addr.is_ipv6() {
        socket.set_only_v6(true).map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&l.addr.into()).map_err(err)?;
    socket.listen(l.backlog).map_err(err)?;
    Ok(socket.into())
}

fn bind_udp(l: &ListenConf) -> Result<UdpSocket, RunError> {
    let err = |source| RunError::Listen {
        addr: l.addr,
        udp: true,
        source,
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(l.addr),
        socket2::Type::DGRAM,
        None,
    )
    .map_err(err)?;
    if l.reuseport {
        socket.set_reuse_port(true).map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&l.addr.into()).map_err(err)?;
    UdpSocket::from_std(socket.into()).map_err(err)
}

async fn accept_loop(
    listener: TcpListener,
    mut serve: watch::Receiver<ListenValue>,
    shared: Arc<Shared>,
) {
    loop {
        tokio::select! {
            changed = serve.changed() => {
                if changed.is_err() || serve.borrow().is_none() {
                    return;
                }
            }
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some((ctx, listen)) = serve.borrow().clone() else { return };
                shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let Ok(permit) = shared.session_slot() else {
                    tracing::warn!("worker_connections are not enough, dropping {peer}");
                    continue;
                };
                let session_shared = shared.clone();
                shared.sessions.spawn(async move {
                    tcp::session(ctx, session_shared, listen, stream, peer).await;
                    drop(permit);
                });
            }
        }
    }
}

impl Balancer {
    /// Binds every listener and starts serving, TCP sessions on io_uring
    /// where the kernel has it and `OXVIRT_LB_EPOLL=1` does not ask for
    /// tokio's epoll reactor. Call inside a tokio runtime.
    pub fn start(config: Config) -> Result<Balancer, RunError> {
        let epoll = std::env::var("OXVIRT_LB_EPOLL").as_deref() == Ok("1");
        if epoll {
            tracing::info!("TCP sessions on epoll (OXVIRT_LB_EPOLL=1)");
        }
        Self::start_with(config, !epoll)
    }

    /// [`Balancer::start`] with the engine chosen by the caller: `io_uring`
    /// false always uses epoll; true falls back to it when the kernel's
    /// io_uring lacks something.
    pub fn start_with(config: Config, io_uring: bool) -> Result<Balancer, RunError> {
        let zones = Mutex::new(HashMap::new());
        let capacity = config.max_sessions.map(|n| Arc::new(Semaphore::new(n)));
        let api_conf = config.runtime_api.clone();
        let workers = config.workers;
        let generation = build_generation(config, &zones, None)?;
        let shared = Arc::new(Shared {
            sessions: TaskTracker::new(),
            kill: CancellationToken::new(),
            stats: Stats::default(),
            next_conn: AtomicU64::new(0),
            zones,
            current: RwLock::new(Arc::new(Generation {
                config: generation.config.clone(),
                upstreams: Vec::new(),
                servers: Vec::new(),
                retired: CancellationToken::new(),
            })),
            capacity,
        });
        let engine = if io_uring {
            start_engine(workers, &shared)
        } else {
            None
        };
        let mut balancer = Balancer {
            shared,
            engine,
            listeners: HashMap::new(),
            api_stop: CancellationToken::new(),
        };
        balancer.install(generation)?;
        if let Some(listen) = api_conf {
            api::spawn(&listen, balancer.shared.clone(), balancer.api_stop.clone())
                .map_err(RunError::Api)?;
        }
        Ok(balancer)
    }

    /// Whether TCP sessions run on the io_uring engine (else on epoll).
    pub fn uses_io_uring(&self) -> bool {
        self.engine.is_some()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Switches to `config`: listeners that stay keep their sockets (no
    /// refused connections), sessions in flight finish on the old generation.
    pub fn reload(&mut self, config: Config) -> Result<(), RunError> {
        let generation =
            build_generation(config, &self.shared.zones, Some(&self.shared.current()))?;
        self.install(generation)?;
        self.shared.stats.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn install(&mut self, generation: Generation) -> Result<(), RunError> {
        let mut wanted: HashMap<(SocketAddr, bool), (Arc<ServerCtx>, ListenConf)> = HashMap::new();
        for ctx in &generation.servers {
            for l in &ctx.conf.listens {
                wanted.insert((l.addr, l.udp), (ctx.clone(), l.clone()));
            }
        }
        // Bind new sockets first: if one fails, nothing has changed yet.
        let mut fresh = Vec::new();
        for (key, (_, l)) in &wanted {
            if !self.listeners.contains_key(key) {
                let socket = if l.udp {
                    Bound::Udp(bind_udp(l)?)
                } else {
                    Bound::Tcp(bind_tcp(l)?)
                };
                fresh.push((*key, socket));
            }
        }
        self.listeners.retain(|key, handle| {
            let keep = wanted.contains_key(key);
            if !keep {
                let _ = handle.serve.send(None);
            }
            keep
        });
        for (key, handle) in &self.listeners {
            if let Some(value) = wanted.get(key) {
                let _ = handle.serve.send(Some(value.clone()));
            }
        }
        for (key, socket) in fresh {
            let value = wanted.get(&key).cloned();
            let (tx, rx) = watch::channel(value);
            let shared = self.shared.clone();
            match socket {
                Bound::Tcp(l) => self.serve_tcp(l, rx, shared)?,
                Bound::Udp(s) => {
                    tokio::spawn(udp::serve(Arc::new(s), rx, shared));
                }
            }
            self.listeners.insert(key, ListenerHandle { serve: tx });
        }
        let generation = Arc::new(generation);
        let old = std::mem::replace(
            &mut *self
                .shared
                .current
                .write()
                .unwrap_or_else(|e| e.into_inner()),
            generation.clone(),
        );
        // The old checkers stop before the new ones start: kept peers never
        // have two checkers counting their streaks.
        old.retired.cancel();
        health::spawn(&generation, &generation.retired);
        if let Some(engine) = &self.engine {
            engine.refresh();
        }
        Ok(())
    }

    fn serve_tcp(
        &self,
        listener: std::net::TcpListener,
        serve: watch::Receiver<ListenValue>,
        shared: Arc<Shared>,
    ) -> Result<(), RunError> {
        let addr = listener.local_addr().ok();
        let err = |source| RunError::Listen {
            addr: addr.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            udp: false,
            source,
        };
        match &self.engine {
            Some(engine) => {
                // io_uring waits by itself; a blocking socket never makes it spin.
                listener.set_nonblocking(false).map_err(err)?;
                engine.listen(&listener, &serve).map_err(err)?;
            }
            None => {
                let listener = TcpListener::from_std(listener).map_err(err)?;
                tokio::spawn(accept_loop(listener, serve, shared));
            }
        }
        Ok(())
    }

    /// Stops accepting; with `drain`, waits for open sessions to finish,
    /// otherwise ends them now.
    pub async fn shutdown(mut self, drain: bool) {
        for (_, handle) in self.listeners.drain() {
            let _ = handle.serve.send(None);
        }
        self.api_stop.cancel();
        self.shared.current().retired.cancel();
        if !drain {
            self.shared.kill.cancel();
        }
        if let Some(engine) = &self.engine {
            engine.refresh();
            if !drain {
                engine.kill();
            }
        }
        self.shared.sessions.close();
        self.shared.sessions.wait().await;
    }
}

/// The io_uring engine, unless the kernel lacks what it needs.
fn start_engine(workers: usize, shared: &Arc<Shared>) -> Option<Engine> {
    match Engine::start(workers, shared.clone(), tokio::runtime::Handle::current()) {
        Ok(engine) => Some(engine),
        Err(e) => {
            tracing::warn!("TCP sessions on epoll: {e}");
            None
        }
    }
}

enum Bound {
    Tcp(std::net::TcpListener),
    Udp(UdpSocket),
}

/// `oxvirt lb -c FILE`: runs until SIGTERM/SIGINT (fast) or SIGQUIT (drain);
/// SIGHUP reloads the file. Returns the process exit code.
pub fn run_file(path: &Path) -> Result<u8, RunError> {
    let config = Config::load(path)?;
    let runtime = if config.workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers)
            .enable_all()
            .build()
    }
    .map_err(RunError::Runtime)?;
    runtime.block_on(serve_until_signal(path, config))
}

async fn serve_until_signal(path: &Path, config: Config) -> Result<u8, RunError> {
    use tokio::signal::unix::{signal, SignalKind};
    let pid_file = config.pid_file.clone();
    let sig = |kind| signal(kind).map_err(RunError::Signals);
    let (mut hup, mut term, mut int, mut quit) = (
        sig(SignalKind::hangup())?,
        sig(SignalKind::terminate())?,
        sig(SignalKind::interrupt())?,
        sig(SignalKind::quit())?,
    );
    // Handlers first: a signal that arrives once we listen must not kill us.
    let mut balancer = Balancer::start(config)?;
    if let Some(pid) = &pid_file {
        std::fs::write(pid, format!("{}\n", std::process::id())).map_err(|source| {
            RunError::Pid {
                path: pid.clone(),
                source,
            }
        })?;
    }
    tracing::info!(config = %path.display(), "oxvirt lb started");
    let drain = loop {
        tokio::select! {
            _ = hup.recv() => match Config::load(path).map_err(RunError::from).and_then(|c| balancer.reload(c)) {
                Ok(()) => tracing::info!("reloaded {}", path.display()),
                Err(e) => tracing::error!("reload failed, keeping the running configuration: {e}"),
            },
            _ = term.recv() => break false,
            _ = int.recv() => break false,
            _ = quit.recv() => break true,
        }
    };
    tracing::info!(drain, "shutting down");
    balancer.shutdown(drain).await;
    if let Some(pid) = &pid_file {
        let _ = std::fs::remove_file(pid);
    }
    Ok(0)
}
