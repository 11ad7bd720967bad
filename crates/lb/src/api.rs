//! Runtime API: HTTP/1.1 + JSON on a local TCP port or a unix socket.
//!
//! - `GET /api/upstreams`: every upstream with per-server state and counters
//! - `GET /api/upstreams/NAME`
//! - `PATCH /api/upstreams/NAME/servers/ID` with `{"weight":N,"down":bool,"drain":bool}`
//! - `GET /api/stats`: balancer-wide counters
//! - `GET /metrics`: the same numbers in Prometheus text format

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::balancer::{PeerStatus, Upstream};
use crate::config::ApiListen;
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
}

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
            Ok((ct, body)) => ("200 OK", ct, body),
            Err(e @ ApiError::NotFound(_)) => ("404 Not Found", "application/json", error_json(&e)),
            Err(e @ ApiError::Bad(_)) => ("400 Bad Request", "application/json", error_json(&e)),
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
    id: usize,
    server: String,
    weight: u32,
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

fn view(u: &Upstream) -> UpstreamView {
    UpstreamView {
        name: u.name.clone(),
        servers: u
            .peers
            .iter()
            .enumerate()
            .map(|(id, p)| ServerView {
                id,
                server: p.conf.addr.to_string(),
                weight: p.weight.load(Ordering::Relaxed),
                backup: p.conf.backup,
                state: u.status(id),
                active: p.active.load(Ordering::Relaxed),
                connections: p.connections.load(Ordering::Relaxed),
                sent: p.bytes_sent.load(Ordering::Relaxed),
                received: p.bytes_received.load(Ordering::Relaxed),
                fails: p.failures.load(Ordering::Relaxed),
            })
            .collect(),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    weight: Option<u32>,
    down: Option<bool>,
    drain: Option<bool>,
}

fn route(r: &Request, shared: &Shared) -> Result<(&'static str, String), ApiError> {
    let generation = shared.current();
    let find = |name: &str| {
        generation
            .upstreams
            .iter()
            .find(|u| u.name == name)
            .ok_or_else(|| ApiError::NotFound(format!("upstream \"{name}\"")))
    };
    let parts: Vec<&str> = r.path.trim_matches('/').split('/').collect();
    let json = |v: serde_json::Value| Ok(("application/json", v.to_string()));
    match (r.method.as_str(), parts.as_slice()) {
        ("GET", ["api", "upstreams"]) => {
            let all: Vec<UpstreamView> = generation.upstreams.iter().map(|u| view(u)).collect();
            json(serde_json::json!(all))
        }
        ("GET", ["api", "upstreams", name]) => json(serde_json::json!(view(find(name)?))),
        ("PATCH", ["api", "upstreams", name, "servers", id]) => {
            let u = find(name)?;
            let peer = id
                .parse::<usize>()
                .ok()
                .and_then(|i| u.peers.get(i))
                .ok_or_else(|| ApiError::NotFound(format!("server {id} in upstream \"{name}\"")))?;
            let patch: Patch = serde_json::from_slice(&r.body)
                .map_err(|e| ApiError::Bad(format!("JSON body: {e}")))?;
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
            json(serde_json::json!(view(u)))
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
            "text/plain; version=0.0.4",
            metrics(shared, &generation.upstreams),
        )),
        _ => Err(ApiError::NotFound(format!("{} {}", r.method, r.path))),
    }
}

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
    for (name, kind, get) in series {
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for u in upstreams {
            for p in &u.peers {
                let _ = writeln!(
                    out,
                    "{name}{{upstream=\"{}\",server=\"{}\"}} {}",
                    u.name,
                    p.conf.addr,
                    get(p)
                );
            }
        }
    }
    let _ = writeln!(out, "# TYPE oxvirt_lb_upstream_up gauge");
    for u in upstreams {
        for (i, p) in u.peers.iter().enumerate() {
            let up = u8::from(u.status(i) == PeerStatus::Up);
            let _ = writeln!(
                out,
                "oxvirt_lb_upstream_up{{upstream=\"{}\",server=\"{}\"}} {up}",
                u.name, p.conf.addr
            );
        }
    }
    out
}
