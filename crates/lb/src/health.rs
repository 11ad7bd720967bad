//! Active health checks (`health_check` in a server block, nginx Plus style):
//! connect (to `port=` if given), optionally `send` and `expect` from a `match`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::balancer::{Peer, Upstream};
use crate::config::{Expect, HealthCheck};
use crate::runtime::Generation;

/// Most response bytes a `match` looks at.
const EXPECT_WINDOW: usize = 4096;

/// Starts one checker per upstream that a `health_check` covers (the first
/// `health_check` naming it wins). Peers kept across a reload keep their
/// health and check streaks; the checker always probes the current peers,
/// including those the API added.
pub fn spawn(generation: &Arc<Generation>, stop: &CancellationToken) {
    let mut covered = HashSet::new();
    for ctx in &generation.servers {
        let Some(hc) = &ctx.conf.health_check else {
            continue;
        };
        if covered.insert(ctx.upstream.name.clone()) {
            tokio::spawn(check_loop(
                ctx.upstream.clone(),
                Arc::new(hc.clone()),
                stop.clone(),
            ));
        }
    }
    // A peer carried over from a configuration that checked it, into one that
    // does not, must not stay down for good.
    for upstream in &generation.upstreams {
        if !covered.contains(&upstream.name) {
            for p in upstream.peers() {
                p.healthy.store(true, Ordering::Relaxed);
                p.check_fails.store(0, Ordering::Relaxed);
                p.check_passes.store(0, Ordering::Relaxed);
            }
        }
    }
}

async fn check_loop(upstream: Arc<Upstream>, hc: Arc<HealthCheck>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(hc.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let mut probes = JoinSet::new();
        for peer in upstream.peers() {
            let (hc, name) = (hc.clone(), upstream.name.clone());
            probes.spawn(async move {
                let target = SocketAddr::new(
                    peer.conf.addr.ip(),
                    hc.port.unwrap_or(peer.conf.addr.port()),
                );
                let result = tokio::time::timeout(hc.interval, probe(target, &hc))
                    .await
                    .unwrap_or_else(|_| Err("timed out".into()));
                record(&name, &peer, &hc, result);
            });
        }
        // Dropping the set on stop aborts the probes still running.
        tokio::select! {
            () = stop.cancelled() => return,
            () = async { while probes.join_next().await.is_some() {} } => {}
        }
    }
}

/// Counts one check result; `fails` in a row mark the peer down, `passes` up.
fn record(upstream: &str, p: &Peer, hc: &HealthCheck, result: Result<(), String>) {
    let healthy = p.healthy.load(Ordering::Relaxed);
    match result {
        Ok(()) => {
            p.check_fails.store(0, Ordering::Relaxed);
            let passes = p.check_passes.fetch_add(1, Ordering::Relaxed) + 1;
            if !healthy && passes >= hc.passes {
                p.healthy.store(true, Ordering::Relaxed);
                tracing::info!(upstream, peer = %p.conf.addr, "health check passed, peer is up");
            }
        }
        Err(e) => {
            p.check_passes.store(0, Ordering::Relaxed);
            let fails = p.check_fails.fetch_add(1, Ordering::Relaxed) + 1;
            if healthy && fails >= hc.fails {
                p.healthy.store(false, Ordering::Relaxed);
                tracing::warn!(upstream, peer = %p.conf.addr, "health check failed, peer is down: {e}");
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
