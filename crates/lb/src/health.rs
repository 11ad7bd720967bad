//! Active health checks (`health_check` in a server block, nginx Plus style):
//! connect (to `port=` if given), optionally `send` and `expect` from a `match`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::balancer::Upstream;
use crate::config::{Expect, HealthCheck};
use crate::runtime::Generation;

/// Most response bytes a `match` looks at.
const EXPECT_WINDOW: usize = 4096;

/// Starts one checker per peer of every upstream a `health_check` covers.
pub fn spawn(generation: &Arc<Generation>, stop: &CancellationToken) {
    for ctx in &generation.servers {
        let Some(hc) = &ctx.conf.health_check else {
            continue;
        };
        for peer in 0..ctx.upstream.peers.len() {
            tokio::spawn(check_loop(
                ctx.upstream.clone(),
                peer,
                hc.clone(),
                stop.clone(),
            ));
        }
    }
}

async fn check_loop(
    upstream: Arc<Upstream>,
    peer: usize,
    hc: HealthCheck,
    stop: CancellationToken,
) {
    let p = &upstream.peers[peer];
    let target = SocketAddr::new(p.conf.addr.ip(), hc.port.unwrap_or(p.conf.addr.port()));
    let mut ticker = tokio::time::interval(hc.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut fails, mut passes) = (0u32, 0u32);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let result = tokio::select! {
            () = stop.cancelled() => return,
            r = tokio::time::timeout(hc.interval, probe(target, &hc)) => r.unwrap_or_else(|_| Err("timed out".into())),
        };
        let healthy = p.healthy.load(Ordering::Relaxed);
        match result {
            Ok(()) => {
                fails = 0;
                passes += 1;
                if !healthy && passes >= hc.passes {
                    p.healthy.store(true, Ordering::Relaxed);
                    tracing::info!(upstream = %upstream.name, peer = %p.conf.addr, "health check passed, peer is up");
                }
            }
            Err(e) => {
                passes = 0;
                fails += 1;
                if healthy && fails >= hc.fails {
                    p.healthy.store(false, Ordering::Relaxed);
                    tracing::warn!(upstream = %upstream.name, peer = %p.conf.addr, "health check failed, peer is down: {e}");
                }
            }
        }
    }
}

async fn probe(target: SocketAddr, hc: &HealthCheck) -> Result<(), String> {
    let mut stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    let Some(m) = &hc.check else { return Ok(()) };
    if !m.send.is_empty() {
        stream
            .write_all(&m.send)
            .await
            .map_err(|e| format!("send: {e}"))?;
    }
    let Some(expect) = &m.expect else {
        return Ok(());
    };
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while seen.len() < EXPECT_WINDOW {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if matches(expect, &seen) {
            return Ok(());
        }
    }
    Err(format!(
        "match \"{}\": response {:?} did not match",
        m.name,
        String::from_utf8_lossy(&seen)
    ))
}

fn matches(expect: &Expect, seen: &[u8]) -> bool {
    match expect {
        Expect::Contains(needle) => seen
            .windows(needle.len().max(1))
            .any(|w| w == needle.as_slice()),
        Expect::Regex(re) => re.is_match(seen),
    }
}
