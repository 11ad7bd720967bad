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

/// Live sessions: client address to (session id, datagram queue).
type SessionMap = HashMap<SocketAddr, (u64, mpsc::Sender<Vec<u8>>)>;
type Sessions = Arc<Mutex<SessionMap>>;

pub async fn serve(
    socket: Arc<UdpSocket>,
    mut serve: watch::Receiver<ListenValue>,
    shared: Arc<Shared>,
) {
    let sessions: Sessions = Arc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            changed = serve.changed() => {
                if changed.is_err() || serve.borrow().is_none() {
                    return;
                }
            }
            received = socket.recv_from(&mut buf) => {
                let Ok((n, client)) = received else { continue };
                let data = buf[..n].to_vec();
                let existing = lock(&sessions).get(&client).map(|(_, tx)| tx.clone());
                if let Some(tx) = existing {
                    // A full queue drops the datagram, as a congested network would.
                    if !matches!(tx.try_send(data.clone()), Err(mpsc::error::TrySendError::Closed(_))) {
                        continue;
                    }
                }
                let Some((ctx, _)) = serve.borrow().clone() else { return };
                start_session(ctx, shared.clone(), socket.clone(), sessions.clone(), client, data);
            }
        }
    }
}

fn lock(s: &Sessions) -> std::sync::MutexGuard<'_, SessionMap> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

fn start_session(
    ctx: Arc<ServerCtx>,
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    sessions: Sessions,
    client: SocketAddr,
    first: Vec<u8>,
) {
    let id = shared.next_connection();
    let (tx, rx) = mpsc::channel(QUEUE);
    lock(&sessions).insert(client, (id, tx));
    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
    let task_shared = shared.clone();
    shared.sessions.spawn(async move {
        let local = socket.local_addr().unwrap_or(client);
        let mut vars = Vars::new(client, local, true, id);
        vars.status = tokio::select! {
            status = session(&ctx, &task_shared, &socket, rx, first, &mut vars) => status,
            () = task_shared.kill.cancelled() => 200,
        };
        let mut map = lock(&sessions);
        if map.get(&client).is_some_and(|(sid, _)| *sid == id) {
            map.remove(&client);
        }
        drop(map);
        for (log, format) in &ctx.logs {
            log.write_line(&format.render(&vars));
        }
    });
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
