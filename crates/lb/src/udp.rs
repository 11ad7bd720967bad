//! UDP sessions keyed by client address, with `proxy_timeout` (idle) and
//! `proxy_responses`; PROXY v2 headers (DGRAM) prepended when enabled.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::config::Access;
use crate::proxy_protocol;
use crate::runtime::{ListenValue, ServerCtx, Shared};
use crate::vars::Vars;

const MAX_DATAGRAM: usize = 65535;
/// Datagrams queued per session before new ones are dropped (UDP may drop).
const QUEUE: usize = 256;

/// A session is one client socket, and with `listen ... udp proxy_protocol`
/// one original source from the PROXY header (a proxy may multiplex clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SessionKey {
    client: SocketAddr,
    source: Option<SocketAddr>,
}

/// Live sessions: key to (session id, datagram queue).
type SessionMap = HashMap<SessionKey, (u64, mpsc::Sender<Vec<u8>>)>;
type Sessions = Arc<Mutex<SessionMap>>;

pub async fn serve(
    socket: Arc<UdpSocket>,
    mut serve: watch::Receiver<ListenValue>,
    shared: Arc<Shared>,
) {
    let sessions: Sessions = Arc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut current = serve.borrow().clone();
    loop {
        tokio::select! {
            changed = serve.changed() => {
                current = serve.borrow().clone();
                if changed.is_err() || current.is_none() {
                    return;
                }
            }
            received = socket.recv_from(&mut buf) => {
                let Ok((n, client)) = received else { continue };
                let Some((ctx, listen)) = &current else { return };
                let (header, payload) = if listen.proxy_protocol {
                    match proxy_protocol::parse_datagram(&buf[..n]) {
                        Ok((h, len)) => (Some(h), &buf[len..n]),
                        Err(e) => {
                            // Per datagram, so not above debug: a flood must not flood the log.
                            tracing::debug!(%client, "PROXY protocol: {e}");
                            shared.stats.proxy_protocol_errors.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                } else {
                    (None, &buf[..n])
                };
                let key = SessionKey { client, source: header.and_then(|h| h.source) };
                let mut data = payload.to_vec();
                let existing = lock(&sessions).get(&key).map(|(_, tx)| tx.clone());
                if let Some(tx) = existing {
                    // A full queue drops the datagram, as a congested network would;
                    // a closed one means the session just ended: start another.
                    match tx.try_send(data) {
                        Err(mpsc::error::TrySendError::Closed(d)) => data = d,
                        _ => continue,
                    }
                }
                // UDP sessions count against worker_connections too: with a
                // PROXY header per datagram, one socket can claim any number of sources.
                let Ok(permit) = shared.session_slot() else {
                    tracing::debug!(%client, "worker_connections are not enough, dropping a datagram");
                    continue;
                };
                let task_shared = shared.clone();
                let sessions = sessions.clone();
                let id = shared.next_connection();
                let (tx, rx) = mpsc::channel(QUEUE);
                lock(&sessions).insert(key, (id, tx));
                shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let mut vars = Vars::new(client, listen.addr, true, id);
                vars.proxy_protocol = key.source;
                let trusted = ctx.conf.proxy.real_ip_from.iter().any(|c| c.contains(client.ip()));
                if let (true, Some(src)) = (trusted, key.source) {
                    vars.remote = src;
                }
                let started = Started { ctx: ctx.clone(), socket: socket.clone(), key, id, rx, first: data };
                shared.sessions.spawn(async move {
                    run_session(started, task_shared, sessions, vars).await;
                    drop(permit);
                });
            }
        }
    }
}

fn lock(s: &Sessions) -> std::sync::MutexGuard<'_, SessionMap> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a new session starts from.
struct Started {
    ctx: Arc<ServerCtx>,
    socket: Arc<UdpSocket>,
    key: SessionKey,
    id: u64,
    rx: mpsc::Receiver<Vec<u8>>,
    first: Vec<u8>,
}

async fn run_session(s: Started, shared: Arc<Shared>, sessions: Sessions, mut vars: Vars) {
    vars.status = tokio::select! {
        status = session(&s.ctx, &shared, &s.socket, s.rx, s.first, &mut vars) => status,
        () = shared.kill.cancelled() => 200,
    };
    let mut map = lock(&sessions);
    if map.get(&s.key).is_some_and(|(sid, _)| *sid == s.id) {
        map.remove(&s.key);
    }
    drop(map);
    for (log, format) in &s.ctx.logs {
        log.write_line(&format.render(&vars));
    }
}

async fn session(
    ctx: &ServerCtx,
    shared: &Shared,
    socket: &UdpSocket,
    mut rx: mpsc::Receiver<Vec<u8>>,
    first: Vec<u8>,
    vars: &mut Vars,
) -> u16 {
    let proxy = &ctx.conf.proxy;
    let ip = vars.remote.ip();
    let allowed = proxy
        .access
        .iter()
        .find(|(_, c)| c.contains(ip))
        .is_none_or(|(r, _)| *r == Access::Allow);
    if !allowed {
        shared.stats.denied.fetch_add(1, Ordering::Relaxed);
        return 403;
    }
    let key = ctx
        .hash_key
        .as_ref()
        .map(|k| k.render(vars))
        .unwrap_or_default();
    let Some(peer) = ctx.upstream.select(key.as_bytes(), &[]) else {
        return 502;
    };
    let addr = peer.conf.addr;
    vars.upstream_addr.push(addr);
    let header = proxy
        .send_proxy_protocol
        .map(|_| proxy_protocol::encode_v2(vars.remote, vars.server, true))
        .unwrap_or_default();
    let result = exchange(ctx, socket, &mut rx, first, addr, &header, vars).await;
    peer.bytes_sent
        .fetch_add(vars.upstream_bytes_sent, Ordering::Relaxed);
    peer.bytes_received
        .fetch_add(vars.upstream_bytes_received, Ordering::Relaxed);
    ctx.upstream.release(&peer, result.is_err());
    match result {
        Ok(()) => 200,
        Err(e) => {
            tracing::warn!(client = %vars.client, upstream = %addr, "udp session: {e}");
            502
        }
    }
}

async fn exchange(
    ctx: &ServerCtx,
    socket: &UdpSocket,
    rx: &mut mpsc::Receiver<Vec<u8>>,
    first: Vec<u8>,
    addr: SocketAddr,
    header: &[u8],
    vars: &mut Vars,
) -> std::io::Result<()> {
    let proxy = &ctx.conf.proxy;
    let bind = proxy.bind.unwrap_or(if addr.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    });
    let up = UdpSocket::bind(SocketAddr::new(bind, 0)).await?;
    up.connect(addr).await?;
    let mut requests: u64 = 0;
    let mut responses: u64 = 0;
    let mut pending = Some(first);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        if let Some(data) = pending.take() {
            let datagram = [header, data.as_slice()].concat();
            up.send(&datagram).await?;
            requests += 1;
            vars.bytes_received += data.len() as u64;
            vars.upstream_bytes_sent += datagram.len() as u64;
        }
        if proxy.responses.is_some_and(|r| responses >= requests * r) {
            return Ok(());
        }
        tokio::select! {
            data = rx.recv() => match data {
                Some(d) => pending = Some(d),
                None => return Ok(()),
            },
            n = up.recv(&mut buf) => {
                let n = n?;
                socket.send_to(&buf[..n], vars.client).await?;
                responses += 1;
                vars.bytes_sent += n as u64;
                vars.upstream_bytes_received += n as u64;
            }
            () = tokio::time::sleep(proxy.timeout) => return Ok(()),
        }
    }
}
