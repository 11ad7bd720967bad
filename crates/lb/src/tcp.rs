//! One TCP session: PROXY header, realip, access rules, limit_conn, upstream
//! selection with retries, PROXY header to the upstream, relay, access log.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpSocket, TcpStream};

use crate::balancer::Peer;
use crate::config::{Access, ListenConf, ProxyVersion};
use crate::limits::Slot;
use crate::proxy_protocol;
use crate::relay::{self, Direction, Relay};
use crate::runtime::{ServerCtx, Shared};
use crate::vars::Vars;

/// nginx stream `$status` values.
pub(crate) const STATUS_OK: u16 = 200;
pub(crate) const STATUS_BAD_REQUEST: u16 = 400;
pub(crate) const STATUS_FORBIDDEN: u16 = 403;
pub(crate) const STATUS_INTERNAL: u16 = 500;
pub(crate) const STATUS_BAD_GATEWAY: u16 = 502;
pub(crate) const STATUS_UNAVAILABLE: u16 = 503;

pub async fn session(
    ctx: Arc<ServerCtx>,
    shared: Arc<Shared>,
    listen: ListenConf,
    client: TcpStream,
    peer: SocketAddr,
) {
    // getsockname only when the listen address does not already say it.
    let local = if listen.addr.ip().is_unspecified() {
        client.local_addr().unwrap_or(listen.addr)
    } else {
        listen.addr
    };
    let id = shared.next_connection();
    let mut vars = Vars::new(peer, local, false, id);
    // A fast stop ends sessions in every phase, not only while relaying.
    vars.status = tokio::select! {
        status = run(&ctx, &shared, &listen, client, &mut vars) => status,
        () = shared.kill.cancelled() => STATUS_OK,
    };
    for (log, format) in &ctx.logs {
        log.write_line(&format.render(&vars));
    }
}

async fn run(
    ctx: &ServerCtx,
    shared: &Shared,
    listen: &ListenConf,
    mut client: TcpStream,
    vars: &mut Vars,
) -> u16 {
    let proxy = &ctx.conf.proxy;
    let mut early = Vec::new();
    if listen.proxy_protocol {
        match proxy_protocol::read_header(&mut client, proxy.proxy_protocol_timeout).await {
            Ok((header, rest)) => {
                vars.proxy_protocol = header.source;
                let trusted = proxy
                    .real_ip_from
                    .iter()
                    .any(|c| c.contains(vars.client.ip()));
                if let (true, Some(src)) = (trusted, header.source) {
                    vars.remote = src;
                }
                early = rest;
            }
            Err(e) => {
                tracing::info!(client = %vars.client, "PROXY protocol: {e}");
                shared
                    .stats
                    .proxy_protocol_errors
                    .fetch_add(1, Ordering::Relaxed);
                return STATUS_BAD_REQUEST;
            }
        }
    }
    if !allowed(ctx, vars) {
        shared.stats.denied.fetch_add(1, Ordering::Relaxed);
        return STATUS_FORBIDDEN;
    }
    let Some(_slots) = take_slots(ctx, vars) else {
        shared.stats.limited.fetch_add(1, Ordering::Relaxed);
        return STATUS_UNAVAILABLE;
    };
    let Some((upstream, peer)) = connect(ctx, vars).await else {
        return STATUS_BAD_GATEWAY;
    };
    let status = proxy_session(ctx, &client, &upstream, vars, &early).await;
    peer.bytes_sent
        .fetch_add(vars.upstream_bytes_sent, Ordering::Relaxed);
    peer.bytes_received
        .fetch_add(vars.upstream_bytes_received, Ordering::Relaxed);
    ctx.upstream.release(&peer, false);
    status
}

/// `allow`/`deny`: the first rule matching the client address decides.
pub(crate) fn allowed(ctx: &ServerCtx, vars: &Vars) -> bool {
    let ip = vars.remote.ip();
    ctx.conf
        .proxy
        .access
        .iter()
        .find(|(_, cidr)| cidr.contains(ip))
        .is_none_or(|(rule, _)| *rule == Access::Allow)
}

pub(crate) fn take_slots(ctx: &ServerCtx, vars: &Vars) -> Option<Vec<Slot>> {
    let mut slots = Vec::new();
    for (zone, limit) in &ctx.limits {
        match zone.acquire(zone.key.render(vars), *limit) {
            Ok(slot) => slots.extend(slot),
            Err(e) => {
                tracing::info!(client = %vars.remote, "limiting connections: {e}");
                return None;
            }
        }
    }
    Some(slots)
}

/// Tries peers until one accepts, within proxy_next_upstream's limits.
async fn connect(ctx: &ServerCtx, vars: &mut Vars) -> Option<(TcpStream, Arc<Peer>)> {
    let proxy = &ctx.conf.proxy;
    let upstream = &ctx.upstream;
    let key = ctx
        .hash_key
        .as_ref()
        .map(|k| k.render(vars))
        .unwrap_or_default();
    // Peers that failed to connect (no allocation when the first one works).
    let mut tried = Vec::new();
    let started = Instant::now();
    loop {
        let peer = upstream.select(key.as_bytes(), &tried)?;
        let addr = peer.conf.addr;
        vars.upstream_addr.push(addr);
        let attempt = Instant::now();
        match connect_one(addr, proxy.bind, proxy.connect_timeout).await {
            Ok(stream) => {
                vars.upstream_connect_time = Some(attempt.elapsed());
                return Some((stream, peer));
            }
            Err(e) => {
                tracing::warn!(upstream = %upstream.name, peer = %addr, client = %vars.remote, "connect failed: {e}");
                upstream.release(&peer, true);
                tried.push(peer.id);
            }
        }
        let out_of_tries =
            proxy.next_upstream_tries > 0 && tried.len() >= proxy.next_upstream_tries as usize;
        let out_of_time = !proxy.next_upstream_timeout.is_zero()
            && started.elapsed() >= proxy.next_upstream_timeout;
        if !proxy.next_upstream || out_of_tries || out_of_time {
            return None;
        }
    }
}

async fn connect_one(
    addr: SocketAddr,
    bind: Option<std::net::IpAddr>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = bind {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn proxy_session(
    ctx: &ServerCtx,
    client: &TcpStream,
    upstream: &TcpStream,
    vars: &mut Vars,
    early: &[u8],
) -> u16 {
    let proxy = &ctx.conf.proxy;
    let header = match proxy.send_proxy_protocol {
        Some(ProxyVersion::V1) => proxy_protocol::encode_v1(vars.remote, vars.server),
        Some(ProxyVersion::V2) => proxy_protocol::encode_v2(vars.remote, vars.server, false),
        None => Vec::new(),
    };
    let first = [header.as_slice(), early].concat();
    if let Err(e) = relay::write_all(upstream, &first).await {
        tracing::warn!(client = %vars.remote, "writing to upstream: {e}");
        return STATUS_BAD_GATEWAY;
    }
    let (up_bytes, down_bytes) = (AtomicU64::new(early.len() as u64), AtomicU64::new(0));
    let result = Relay {
        up: Direction {
            from: client,
            to: upstream,
            rate: proxy.upload_rate,
            bytes: &up_bytes,
            side: "client to upstream",
        },
        down: Direction {
            from: upstream,
            to: client,
            rate: proxy.download_rate,
            bytes: &down_bytes,
            side: "upstream to client",
        },
        idle: proxy.timeout,
        half_close: proxy.half_close,
        buffer_size: proxy.buffer_size,
    }
    .run()
    .await;
    vars.bytes_received = up_bytes.load(Ordering::Relaxed);
    vars.bytes_sent = down_bytes.load(Ordering::Relaxed);
    vars.upstream_bytes_sent = vars.bytes_received + header.len() as u64;
    vars.upstream_bytes_received = vars.bytes_sent;
    match result {
        Ok(()) => STATUS_OK,
        Err(e) => {
            tracing::info!(client = %vars.remote, "session ended: {e}");
            match e {
                relay::RelayError::Io { .. } => STATUS_INTERNAL,
                _ => STATUS_OK,
            }
        }
    }
}
