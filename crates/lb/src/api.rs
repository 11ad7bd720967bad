//! Runtime API: HTTP/1.1 + JSON on a local TCP port or a unix socket.
//!
//! - `GET /api/upstreams`: every upstream with per-server state and counters
//! - `GET /api/upstreams/NAME`
//! - `GET /api/upstreams/NAME/servers[/ID]`
//! - `POST /api/upstreams/NAME/servers` with `{"server":"IP:PORT","weight":N,...}`
//! - `PATCH /api/upstreams/NAME/servers/ID` with `{"weight":N,"down":bool,"drain":bool}`
//! - `DELETE /api/upstreams/NAME/servers/ID`
//! - nginx Plus's `/api/N/stream/upstreams/...` paths mean the same
//! - `GET /api/stats`: balancer-wide counters
//! - `GET /metrics`: the same numbers in Prometheus text format

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::balancer::{Peer, PeerStatus, Upstream, UpstreamError};
use crate::config::{parse_duration, ApiListen, PeerConf};
use crate::runtime::Shared;

/// Largest request (headers and body) the API reads.
const MAX_REQUEST: usize = 64 * 1024;

pub fn spawn(
    listen: &ApiListen,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    match listen {
        ApiListen::Tcp(addr) => {
            let std = std::net::TcpListener::bind(addr)?;
            std.set_nonblocking(true)?;
            let listener = TcpListener::from_std(std)?;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        Ok((s, _)) = listener.accept() => { tokio::spawn(handle(s, shared.clone())); }
                    }
                }
            });
        }
        ApiListen::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path)?;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        Ok((s, _)) = listener.accept() => { tokio::spawn(handle(s, shared.clone())); }
                    }
                }
            });
        }
    }
    Ok(())
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("bad request: {0}")]
    Bad(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("{0}")]
    Internal(String),
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> ApiError {
        match e {
            UpstreamError::NoSuchServer { .. } => ApiError::NotFound(e.to_string()),
            UpstreamError::State { .. } => ApiError::Internal(e.to_string()),
            _ => ApiError::Bad(e.to_string()),
        }
    }
}

const OK: &str = "200 OK";
const CREATED: &str = "201 Created";

async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Result<Request, ApiError> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_REQUEST {
            return Err(ApiError::Bad("headers too large".into()));
        }
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| ApiError::Bad(e.to_string()))?;
        if n == 0 {
            return Err(ApiError::Bad("connection closed mid-request".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, path) = (
        first.next().unwrap_or_default(),
        first.next().unwrap_or_default(),
    );
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| ApiError::Bad("bad Content-Length".into()))
        })
        .transpose()?
        .unwrap_or(0);
    if length > MAX_REQUEST {
        return Err(ApiError::Bad("body too large".into()));
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| ApiError::Bad(e.to_string()))?;
        if n == 0 {
            return Err(ApiError::Bad("body shorter than Content-Length".into()));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        body,
    })
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, shared: Arc<Shared>) {
    let (status, content_type, body) =
        match read_request(&mut s).await.and_then(|r| route(&r, &shared)) {
            Ok(reply) => reply,
            Err(e @ ApiError::NotFound(_)) => ("404 Not Found", "application/json", error_json(&e)),
            Err(e @ ApiError::Bad(_)) => ("400 Bad Request", "application/json", error_json(&e)),
            Err(e @ ApiError::Internal(_)) => {
                tracing::error!("runtime API: {e}");
                (
                    "500 Internal Server Error",
                    "application/json",
                    error_json(&e),
                )
            }
        };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(response.as_bytes()).await;
    let _ = s.shutdown().await;
}

fn error_json(e: &ApiError) -> String {
    serde_json::json!({ "error": e.to_string() }).to_string()
}

#[derive(Serialize)]
struct ServerView {
    id: u64,
    server: String,
    weight: u32,
    max_conns: u32,
    max_fails: u32,
    fail_timeout: String,
    backup: bool,
    state: PeerStatus,
    active: u32,
    connections: u64,
    sent: u64,
    received: u64,
    fails: u64,
}

#[derive(Serialize)]
struct UpstreamView {
    name: String,
    servers: Vec<ServerView>,
}

fn server_view(p: &Peer, state: PeerStatus) -> ServerView {
    ServerView {
        id: p.id,
        server: p.conf.addr.to_string(),
        weight: p.weight.load(Ordering::Relaxed),
        max_conns: p.conf.max_conns,
        max_fails: p.conf.max_fails,
        fail_timeout: format!("{}s", p.conf.fail_timeout.as_secs_f64()),
        backup: p.conf.backup,
        state,
        active: p.active.load(Ordering::Relaxed),
        connections: p.connections.load(Ordering::Relaxed),
        sent: p.bytes_sent.load(Ordering::Relaxed),
        received: p.bytes_received.load(Ordering::Relaxed),
        fails: p.failures.load(Ordering::Relaxed),
    }
}

fn servers(u: &Upstream) -> Vec<ServerView> {
    u.statuses()
        .iter()
        .map(|(p, state)| server_view(p, *state))
        .collect()
}

fn view(u: &Upstream) -> UpstreamView {
    UpstreamView {
        name: u.name.clone(),
        servers: servers(u),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    weight: Option<u32>,
    down: Option<bool>,
    drain: Option<bool>,
}

/// A server to add, in nginx Plus's field names.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewServer {
    server: String,
    weight: Option<u32>,
    max_conns: Option<u32>,
    max_fails: Option<u32>,
    fail_timeout: Option<String>,
    backup: Option<bool>,
    down: Option<bool>,
    drain: Option<bool>,
}

impl NewServer {
    fn into_peer(self) -> Result<(PeerConf, bool, bool), ApiError> {
        let addr: SocketAddr = self.server.parse().map_err(|_| {
            ApiError::Bad(format!(
                "\"server\": \"{}\" is not an IP address with a port",
                self.server
            ))
        })?;
        let mut conf = PeerConf::new(self.server, addr);
        conf.weight = self.weight.unwrap_or(conf.weight);
        conf.max_conns = self.max_conns.unwrap_or(conf.max_conns);
        conf.max_fails = self.max_fails.unwrap_or(conf.max_fails);
        conf.backup = self.backup.unwrap_or(false);
        if let Some(t) = &self.fail_timeout {
            conf.fail_timeout = parse_duration(t)
                .ok_or_else(|| ApiError::Bad(format!("\"fail_timeout\": invalid time \"{t}\"")))?;
        }
        Ok((
            conf,
            self.down.unwrap_or(false),
            self.drain.unwrap_or(false),
        ))
    }
}

fn body<'a, T: serde::Deserialize<'a>>(r: &'a Request) -> Result<T, ApiError> {
    serde_json::from_slice(&r.body).map_err(|e| ApiError::Bad(format!("JSON body: {e}")))
}

fn server_id(u: &Upstream, id: &str) -> Result<u64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::NotFound(format!("server {id} in upstream \"{}\"", u.name)))
}

/// `/api/N/stream/upstreams/...` (nginx Plus's paths) is the same as `/api/upstreams/...`.
fn route_parts(path: &str) -> Vec<&str> {
    let mut parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    if parts.len() >= 3
        && parts[0] == "api"
        && parts[1].bytes().all(|b| b.is_ascii_digit())
        && parts[2] == "stream"
    {
        parts.drain(1..3);
    }
    parts
}

type Reply = Result<(&'static str, &'static str, String), ApiError>;

fn json(v: impl Serialize) -> Reply {
    Ok((OK, "application/json", serde_json::json!(v).to_string()))
}

fn route(r: &Request, shared: &Shared) -> Reply {
    let generation = shared.current();
    let find = |name: &str| {
        generation
            .upstreams
            .iter()
            .find(|u| u.name == name)
            .ok_or_else(|| ApiError::NotFound(format!("upstream \"{name}\"")))
    };
    match (r.method.as_str(), route_parts(&r.path).as_slice()) {
        ("GET", ["api", "upstreams"]) => {
            let all: Vec<UpstreamView> = generation.upstreams.iter().map(|u| view(u)).collect();
            json(all)
        }
        ("GET", ["api", "upstreams", name]) => json(view(find(name)?)),
        ("GET", ["api", "upstreams", name, "servers"]) => json(servers(find(name)?)),
        ("GET", ["api", "upstreams", name, "servers", id]) => {
            let u = find(name)?;
            let (p, state) = u.status_of(server_id(u, id)?)?;
            json(server_view(&p, state))
        }
        ("POST", ["api", "upstreams", name, "servers"]) => {
            let u = find(name)?;
            let (conf, down, drain) = body::<NewServer>(r)?.into_peer()?;
            let peer = u.add(conf, down, drain)?;
            tracing::info!(upstream = %u.name, server = %peer.conf.addr, id = peer.id, "server added through the API");
            u.save_state()?;
            // A DELETE racing in may have removed it again: report it as added.
            let state = u.status_of(peer.id).map_or(PeerStatus::Up, |(_, s)| s);
            let view = serde_json::json!(server_view(&peer, state));
            Ok((CREATED, "application/json", view.to_string()))
        }
        ("DELETE", ["api", "upstreams", name, "servers", id]) => {
            let u = find(name)?;
            let peer = u.remove(server_id(u, id)?)?;
            tracing::info!(upstream = %u.name, server = %peer.conf.addr, id = peer.id, "server removed through the API");
            u.save_state()?;
            json(servers(u))
        }
        ("PATCH", ["api", "upstreams", name, "servers", id]) => {
            let u = find(name)?;
            let peer = u.find(server_id(u, id)?)?;
            let patch: Patch = body(r)?;
            if patch.weight == Some(0) {
                return Err(ApiError::Bad("weight must be at least 1".into()));
            }
            if let Some(w) = patch.weight {
                peer.weight.store(w, Ordering::Relaxed);
            }
            if let Some(d) = patch.down {
                peer.admin_down.store(d, Ordering::Relaxed);
            }
            if let Some(d) = patch.drain {
                peer.draining.store(d, Ordering::Relaxed);
            }
            u.save_state()?;
            json(view(u))
        }
        ("GET", ["api", "stats"]) => {
            let s = &shared.stats;
            json(serde_json::json!({
                "accepted": s.accepted.load(Ordering::Relaxed),
                "denied": s.denied.load(Ordering::Relaxed),
                "limited": s.limited.load(Ordering::Relaxed),
                "proxy_protocol_errors": s.proxy_protocol_errors.load(Ordering::Relaxed),
                "over_capacity": s.over_capacity.load(Ordering::Relaxed),
                "reloads": s.reloads.load(Ordering::Relaxed),
                "active_sessions": shared.sessions.len(),
            }))
        }
        ("GET", ["metrics"]) => Ok((
            OK,
            "text/plain; version=0.0.4",
            metrics(shared, &generation.upstreams),
        )),
        _ => Err(ApiError::NotFound(format!("{} {}", r.method, r.path))),
    }
}

/// An upstream's peers and their states, as [`Upstream::statuses`] gives them.
type PeerStates = Vec<(Arc<Peer>, PeerStatus)>;

/// Reads one number off a peer, for a metrics series.
type PeerValue = fn(&crate::balancer::Peer) -> u64;

fn metrics(shared: &Shared, upstreams: &[Arc<Upstream>]) -> String {
    let mut out = String::new();
    let s = &shared.stats;
    for (name, help, v) in [
        (
            "oxvirt_lb_accepted_total",
            "Client connections and UDP sessions accepted.",
            s.accepted.load(Ordering::Relaxed),
        ),
        (
            "oxvirt_lb_denied_total",
            "Sessions refused by allow/deny.",
            s.denied.load(Ordering::Relaxed),
        ),
        (
            "oxvirt_lb_limited_total",
            "Sessions refused by limit_conn.",
            s.limited.load(Ordering::Relaxed),
        ),
        (
            "oxvirt_lb_proxy_protocol_errors_total",
            "Bad or missing PROXY headers.",
            s.proxy_protocol_errors.load(Ordering::Relaxed),
        ),
        (
            "oxvirt_lb_reloads_total",
            "Successful reloads.",
            s.reloads.load(Ordering::Relaxed),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
    let _ = writeln!(
        out,
        "# TYPE oxvirt_lb_sessions_active gauge\noxvirt_lb_sessions_active {}",
        shared.sessions.len()
    );
    let series: [(&str, &str, PeerValue); 5] = [
        ("oxvirt_lb_upstream_active", "gauge", |p| {
            u64::from(p.active.load(Ordering::Relaxed))
        }),
        ("oxvirt_lb_upstream_connections_total", "counter", |p| {
            p.connections.load(Ordering::Relaxed)
        }),
        ("oxvirt_lb_upstream_sent_bytes_total", "counter", |p| {
            p.bytes_sent.load(Ordering::Relaxed)
        }),
        ("oxvirt_lb_upstream_received_bytes_total", "counter", |p| {
            p.bytes_received.load(Ordering::Relaxed)
        }),
        ("oxvirt_lb_upstream_fails_total", "counter", |p| {
            p.failures.load(Ordering::Relaxed)
        }),
    ];
    let peers: Vec<(&str, PeerStates)> = upstreams
        .iter()
        .map(|u| (u.name.as_str(), u.statuses()))
        .collect();
    for (name, kind, get) in series {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (upstream, list) in &peers {
            for (p, _) in list {
                let _ = writeln!(
                    out,
                    "{name}{{upstream=\"{}\",server=\"{}\"}} {}",
                    upstream,
                    p.conf.addr,
                    get(p)
                );
            }
        }
    }
    let _ = writeln!(out, "# TYPE oxvirt_lb_upstream_up gauge");
    for (upstream, list) in &peers {
        for (p, state) in list {
            let up = u8::from(*state == PeerStatus::Up);
            let _ = writeln!(
                out,
                "oxvirt_lb_upstream_up{{upstream=\"{upstream}\",server=\"{}\"}} {up}",
                p.conf.addr
            );
        }
    }
    out
}
