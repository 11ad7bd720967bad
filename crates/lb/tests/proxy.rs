//! End-to-end TCP proxying through a real balancer on loopback.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_weighted_round_robin_and_hash_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("c").await,
    );
    let (rr, hash) = (free_port(), free_port());
    let _lb = start(
        dir.path(),
        &format!(
            "stream {{
  upstream weighted {{ server {} weight=5; server {} weight=1; server {} weight=1; }}
  upstream sticky {{ hash $remote_addr consistent; server {}; server {}; server {}; }}
  server {{ listen 127.0.0.1:{rr}; proxy_pass weighted; }}
  server {{ listen 127.0.0.1:{hash}; proxy_pass sticky; }}
}}",
            a.addr, b.addr, c.addr, a.addr, b.addr, c.addr
        ),
    );
    let addr = format!("127.0.0.1:{rr}").parse().unwrap();
    let mut seq = Vec::new();
    for _ in 0..700 {
        seq.push(greeting(addr).await.unwrap());
    }
    assert_eq!(
        seq[..7],
        ["a", "a", "b", "a", "c", "a", "a"],
        "nginx's smooth WRR order"
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    seq.into_iter()
        .for_each(|s| *counts.entry(s).or_default() += 1);
    assert_eq!((counts["a"], counts["b"], counts["c"]), (500, 100, 100));

    // Same client address, same server, every time.
    let addr = format!("127.0.0.1:{hash}").parse().unwrap();
    let first = greeting(addr).await.unwrap();
    for _ in 0..20 {
        assert_eq!(greeting(addr).await.unwrap(), first);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_bulk_transfer_is_exact_and_rate_limit_holds() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start("bulk").await;
    let (fast, slow) = (free_port(), free_port());
    let _lb = start(
        dir.path(),
        &format!(
            "stream {{
  server {{ listen 127.0.0.1:{fast}; proxy_pass {0}; }}
  server {{ listen 127.0.0.1:{slow}; proxy_pass {0}; proxy_download_rate 256k; proxy_upload_rate 256k; }}
}}",
            backend.addr
        ),
    );
    // 32 MiB of a pattern through the splice path, echoed back and compared.
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let echoed = echo_through(fast, &data).await;
    assert!(echoed == data, "splice path corrupted or lost data");

    let data = vec![7u8; 384 * 1024];
    let t = Instant::now();
    let echoed = echo_through(slow, &data).await;
    assert_eq!(echoed, data);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1200),
        "384 KiB at 256 KiB/s took only {took:?}"
    );
    assert!(
        took < Duration::from_secs(6),
        "rate limit far too slow: {took:?}"
    );
}

async fn echo_through(port: u16, data: &[u8]) -> Vec<u8> {
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let payload = data.to_vec();
    // Keep the write half open: without proxy_half_close, a client EOF ends
    // the session (as in nginx) before the echo comes back.
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.unwrap();
        w
    });
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        r.read_exact(&mut b).await.unwrap();
        line.push(b[0]);
    }
    let mut out = vec![0u8; data.len()];
    r.read_exact(&mut out).await.unwrap();
    drop(writer.await.unwrap());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_dead_backend_is_skipped_then_backup_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, spare) = (
        Backend::start("a").await,
        Backend::start("b").await,
        Backend::start("spare").await,
    );
    let dead = free_port();
    let port = free_port();
    let lb = start(
        dir.path(),
        &format!(
            "stream {{
  upstream u {{ server 127.0.0.1:{dead} max_fails=1 fail_timeout=30s; server {} max_fails=2 fail_timeout=30s; server {} max_fails=2 fail_timeout=30s; server {} backup; }}
  server {{ listen 127.0.0.1:{port}; proxy_pass u; proxy_connect_timeout 1s; }}
}}",
            a.addr, b.addr, spare.addr
        ),
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..40 {
        let g = greeting(addr)
            .await
            .expect("a client saw an error although live peers remain");
        assert!(g == "a" || g == "b", "{g}");
    }
    let gen = lb.shared().current();
    let u = &gen.upstreams[0];
    assert_eq!(
        u.peers()[0]
            .failures
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "max_fails=1: tried once, then left alone"
    );
    assert_eq!(spare.count(), 0);
    // Both primaries go away: the backup serves, clients see no errors.
    a.stop().await;
    b.stop().await;
    for _ in 0..10 {
        assert_eq!(greeting(addr).await.unwrap(), "spare");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_access_rules_limit_conn_and_access_log() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start("ok").await;
    let (port, denied_port) = (free_port(), free_port());
    let log = dir.path().join("access.log");
    let lb = start(
        dir.path(),
        &format!(
            "stream {{
  log_format basic '$remote_addr [$time_local] $protocol $status $bytes_sent $bytes_received $session_time \"$upstream_addr\" $server_port';
  access_log {} basic;
  limit_conn_zone $binary_remote_addr zone=perip:10m;
  server {{ listen 127.0.0.1:{port}; proxy_pass {}; limit_conn perip 5; deny 127.0.0.9; allow 127.0.0.0/8; deny all; }}
  server {{ listen 127.0.0.1:{denied_port}; proxy_pass {}; deny all; }}
}}",
            log.display(),
            backend.addr,
            backend.addr
        ),
    );
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // A flood from one address: 5 sessions served, the rest closed at once.
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..60 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        match read_line(&mut s).await {
            Ok(g) => {
                assert_eq!(g, "ok");
                held.push(s);
            }
            Err(_) => refused += 1,
        }
    }
    assert_eq!((held.len(), refused), (5, 55));
    // Another client address is unaffected by the flood.
    let other = tokio::net::TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut s = other.connect(addr).await.unwrap();
    assert_eq!(read_line(&mut s).await.unwrap(), "ok");
    drop(s);
    // allow/deny by source address.
    let banned = tokio::net::TcpSocket::new_v4().unwrap();
    banned.bind("127.0.0.9:0".parse().unwrap()).unwrap();
    let mut s = banned.connect(addr).await.unwrap();
    assert!(closed_without_data(&mut s).await);
    let mut s = TcpStream::connect(("127.0.0.1", denied_port))
        .await
        .unwrap();
    assert!(closed_without_data(&mut s).await);
    drop(held);
    wait_for("sessions to end", Duration::from_secs(5), || {
        lb.shared().sessions.is_empty()
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 63, "{text}");
    assert_eq!(
        lines.iter().filter(|l| l.contains(" TCP 503 0 0 ")).count(),
        55,
        "{text}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains(" TCP 403 ")).count(),
        2,
        "{text}"
    );
    let served: Vec<&&str> = lines.iter().filter(|l| l.contains(" TCP 200 ")).collect();
    assert_eq!(served.len(), 6);
    let want_upstream = format!("\"{}\" {port}", backend.addr);
    assert!(
        served.iter().all(|l| l.starts_with("127.0.0.")
            && l.contains(" 200 3 0 ")
            && l.contains(&want_upstream)),
        "{text}"
    );
    assert!(text.contains("127.0.0.2 ["));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_idle_timeout_and_half_close() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start("x").await;
    let (idle, half) = (free_port(), free_port());
    let _lb = start(
        dir.path(),
        &format!(
            "stream {{
  server {{ listen 127.0.0.1:{idle}; proxy_pass {0}; proxy_timeout 300ms; }}
  server {{ listen 127.0.0.1:{half}; proxy_pass {0}; proxy_half_close on; }}
}}",
            backend.addr
        ),
    );
    let mut s = TcpStream::connect(("127.0.0.1", idle)).await.unwrap();
    assert_eq!(read_line(&mut s).await.unwrap(), "x");
    let t = Instant::now();
    assert!(closed_without_data(&mut s).await);
    assert!(
        t.elapsed() >= Duration::from_millis(250) && t.elapsed() < Duration::from_secs(3),
        "{:?}",
        t.elapsed()
    );

    // With half-close, the reply still flows after the client shuts its write side.
    let mut s = TcpStream::connect(("127.0.0.1", half)).await.unwrap();
    assert_eq!(read_line(&mut s).await.unwrap(), "x");
    s.write_all(b"last words").await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, b"last words");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_worker_connections_caps_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start("ok").await;
    let port = free_port();
    let lb = start(
        dir.path(),
        &format!("events {{ worker_connections 3; }}\nstream {{ server {{ listen 127.0.0.1:{port}; proxy_pass {}; }} }}", backend.addr),
    );
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(read_line(&mut s).await.unwrap(), "ok");
        held.push(s);
    }
    let mut over = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_without_data(&mut over).await,
        "a 4th session went past worker_connections 3"
    );
    drop(held);
    wait_for("sessions to end", Duration::from_secs(5), || {
        lb.shared().sessions.is_empty()
    })
    .await;
    assert_eq!(greeting(addr).await.unwrap(), "ok");
    let over = lb
        .shared()
        .stats
        .over_capacity
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(over, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_next_upstream_tries_and_off() {
    let dir = tempfile::tempdir().unwrap();
    let live = Backend::start("live").await;
    let (d1, d2, d3) = (free_port(), free_port(), free_port());
    let (limited, off, unlimited) = (free_port(), free_port(), free_port());
    let peers = format!(
        "server 127.0.0.1:{d1} max_fails=0; server 127.0.0.1:{d2} max_fails=0; server 127.0.0.1:{d3} max_fails=0; server {} max_fails=0;",
        live.addr
    );
    let _lb = start(
        dir.path(),
        &format!(
            "stream {{
  upstream a {{ {peers} }}
  upstream b {{ {peers} }}
  upstream c {{ {peers} }}
  server {{ listen 127.0.0.1:{limited}; proxy_pass a; proxy_next_upstream_tries 2; }}
  server {{ listen 127.0.0.1:{off}; proxy_pass b; proxy_next_upstream off; }}
  server {{ listen 127.0.0.1:{unlimited}; proxy_pass c; }}
}}"
        ),
    );
    // Round robin starts at the first (dead) peer in each upstream.
    let addr = |p: u16| -> std::net::SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
    assert!(
        greeting(addr(limited)).await.is_err(),
        "2 tries cannot reach the 4th peer"
    );
    assert!(
        greeting(addr(off)).await.is_err(),
        "no retry with proxy_next_upstream off"
    );
    assert_eq!(
        greeting(addr(unlimited)).await.unwrap(),
        "live",
        "unlimited tries reach the live peer"
    );
    assert_eq!(live.count(), 1);
}

/// A listening socket that never accepts, its queue full: SYNs to it get no
/// answer, so connecting to it times out.
fn unanswering_listener() -> (socket2::Socket, Vec<std::net::TcpStream>) {
    let l = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    l.bind(
        &"127.0.0.1:0"
            .parse::<std::net::SocketAddr>()
            .unwrap()
            .into(),
    )
    .unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let queued = (0..3)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        })
        .collect();
    (l, queued)
}

/// Both TCP engines balance, move short and bulk data both ways, give up on
/// a connect that gets no answer after proxy_connect_timeout and go on to
/// the next server, and log what the session did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_io_uring_and_epoll_engines_behave_alike() {
    for io_uring in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (Backend::start("a").await, Backend::start("b").await);
        let (silent, _queued) = unanswering_listener();
        let silent = silent.local_addr().unwrap().as_socket().unwrap();
        let port = free_port();
        let log = dir.path().join("access.log");
        let lb = start_with(
            dir.path(),
            &format!(
                "stream {{
  log_format up '$upstream_addr $status $bytes_received $bytes_sent';
  upstream u {{ server {silent} max_fails=1 fail_timeout=30s; server {}; server {}; }}
  server {{ listen 127.0.0.1:{port}; proxy_pass u; proxy_connect_timeout 300ms; access_log {} up; }}
}}",
                a.addr,
                b.addr,
                log.display()
            ),
            io_uring,
        );
        if io_uring && !require_io_uring(&lb) {
            continue;
        }
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let t = Instant::now();
        assert_eq!(greeting(addr).await.unwrap(), "a", "io_uring={io_uring}");
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "io_uring={io_uring}: the silent server was given up after {took:?}, not ~300ms"
        );
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(greeting(addr).await.unwrap());
        }
        assert_eq!(seen, ["b", "a", "b", "a"], "io_uring={io_uring}");
        let data: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 251) as u8).collect();
        assert_eq!(echo_through(port, &data).await, data, "io_uring={io_uring}");
        let logged = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .count()
        };
        wait_for("six access log lines", Duration::from_secs(5), || {
            logged() >= 6
        })
        .await;
        drop(lb);
        let lines = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = lines.lines().collect();
        assert_eq!(lines.len(), 6, "io_uring={io_uring}: {lines:?}");
        // Sessions log as they end, which need not be the order they began.
        for expected in [
            format!("{silent}, {} 200 0 2", a.addr),
            format!("{} 200 {} {}", b.addr, data.len(), data.len() + 2),
        ] {
            assert!(
                lines.contains(&expected.as_str()),
                "io_uring={io_uring}: no \"{expected}\" in {lines:?}"
            );
        }
    }
}
