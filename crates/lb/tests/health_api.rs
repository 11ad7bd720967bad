//! Active health checks, a backend killed under load, the runtime API,
//! Prometheus metrics and UDP sessions.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UdpSocket, UnixStream};

async fn http(api: &std::path::Path, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(api).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: lb\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (status, body)
}

/// Sessions the balancer sent to `server` so far.
async fn connections(api: &std::path::Path, server: usize) -> u64 {
    let (_, body) = http(api, "GET", "/api/upstreams/app", "").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["servers"][server]["connections"].as_u64().unwrap()
}

async fn state(api: &std::path::Path, server: usize) -> String {
    let (_, body) = http(api, "GET", "/api/upstreams/app", "").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["servers"][server]["state"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_backend_killed_under_load_health_checks_and_api() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (Backend::start("one").await, Backend::start("two").await);
    let port = free_port();
    let api = dir.path().join("api.sock");
    let lb = start(
        dir.path(),
        &format!(
            "stream {{
  runtime_api unix:{};
  match greets {{ expect ~ \"^(one|two)\"; }}
  upstream app {{ server {} max_fails=1 fail_timeout=1s; server {} max_fails=1 fail_timeout=1s; }}
  server {{
    listen 127.0.0.1:{port};
    proxy_pass app;
    proxy_connect_timeout 1s;
    health_check interval=100ms fails=2 passes=2 match=greets;
  }}
}}",
            api.display(),
            one.addr,
            two.addr
        ),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for("api socket", Duration::from_secs(5), || api.exists()).await;
    assert_eq!(state(&api, 1).await, "up");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match greeting(addr).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let two_addr = two.stop().await;
    // Health checks (2 fails x 100 ms) mark it down; passive checks and
    // proxy_next_upstream hide the failure from clients meanwhile.
    for _ in 0..100 {
        if state(&api, 1).await == "unhealthy" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state(&api, 1).await, "unhealthy");
    // The load is one session at a time: at most the one that had just
    // reached the backend's accept queue when it closed sees a reset.
    let in_flight = failed.load(Ordering::Relaxed);
    assert!(in_flight <= 1, "{in_flight} clients saw errors at the kill");
    // While unhealthy it gets no sessions, though the load goes on.
    let while_down = connections(&api, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        connections(&api, 1).await,
        while_down,
        "unhealthy peer got sessions"
    );
    let _revived = Backend::at("two", two_addr).await;
    for _ in 0..100 {
        if state(&api, 1).await == "up" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state(&api, 1).await, "up", "not back after passes");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        in_flight,
        "clients saw errors after the kill ({} ok)",
        ok.load(Ordering::Relaxed)
    );
    assert!(
        connections(&api, 1).await > while_down,
        "revived backend got no sessions"
    );

    // Drain: no new sessions; weight; down; bad requests.
    let (code, _) = http(
        &api,
        "PATCH",
        "/api/upstreams/app/servers/0",
        r#"{"drain":true}"#,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(state(&api, 0).await, "draining");
    // Sessions as the balancer counts them: the backend's own accept count
    // also sees the health checks.
    let before = connections(&api, 0).await;
    for _ in 0..10 {
        assert_eq!(greeting(addr).await.unwrap(), "two");
    }
    assert_eq!(connections(&api, 0).await, before);
    let (code, body) = http(
        &api,
        "PATCH",
        "/api/upstreams/app/servers/0",
        r#"{"drain":false,"weight":3}"#,
    )
    .await;
    assert_eq!(code, 200);
    assert!(body.contains(r#""weight":3"#), "{body}");
    let (code, _) = http(
        &api,
        "PATCH",
        "/api/upstreams/app/servers/1",
        r#"{"down":true}"#,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(state(&api, 1).await, "down");
    assert_eq!(greeting(addr).await.unwrap(), "one");
    assert_eq!(
        http(
            &api,
            "PATCH",
            "/api/upstreams/app/servers/0",
            r#"{"weight":"x"}"#
        )
        .await
        .0,
        400
    );
    assert_eq!(
        http(
            &api,
            "PATCH",
            "/api/upstreams/app/servers/0",
            r#"{"bogus":1}"#
        )
        .await
        .0,
        400
    );
    assert_eq!(
        http(&api, "PATCH", "/api/upstreams/app/servers/9", r#"{}"#)
            .await
            .0,
        404
    );
    assert_eq!(http(&api, "GET", "/api/upstreams/nope", "").await.0, 404);

    let (code, metrics) = http(&api, "GET", "/metrics", "").await;
    assert_eq!(code, 200);
    let line = format!(
        "oxvirt_lb_upstream_up{{upstream=\"app\",server=\"{}\"}} 0",
        two_addr
    );
    assert!(metrics.contains(&line), "{metrics}");
    assert!(metrics.contains("# TYPE oxvirt_lb_upstream_connections_total counter"));
    let (_, stats) = http(&api, "GET", "/api/stats", "").await;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(stats["accepted"].as_u64().unwrap() > 10);
    drop(lb);
}

/// Echoes each datagram back, prefixed with the PROXY v2 source if present.
async fn udp_backend() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let mut data = &buf[..n];
            let mut reply = Vec::new();
            if data.starts_with(b"\r\n\r\n\0\r\nQUIT\n") {
                let (h, rest) = lb::proxy_protocol::read_header(&mut data, Duration::from_secs(1))
                    .await
                    .unwrap();
                reply.extend_from_slice(format!("{}|", h.source.unwrap()).as_bytes());
                reply.extend_from_slice(&rest);
            } else {
                reply.extend_from_slice(data);
            }
            let _ = sock.send_to(&reply, from).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_udp_sessions_responses_timeout_and_proxy_v2() {
    let dir = tempfile::tempdir().unwrap();
    let backend = udp_backend().await;
    let (plain, pp) = (free_udp_port(), free_udp_port());
    let log = dir.path().join("udp.log");
    let lb = start(
        dir.path(),
        &format!(
            "stream {{
  log_format u '$protocol $remote_addr $status $bytes_received $bytes_sent';
  server {{ listen 127.0.0.1:{plain} udp; proxy_pass {backend}; proxy_timeout 300ms; access_log {} u; }}
  server {{ listen 127.0.0.1:{pp} udp; proxy_pass {backend}; proxy_responses 1; proxy_protocol on; }}
}}",
            log.display()
        ),
    );
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = client.local_addr().unwrap();
    let mut buf = [0u8; 1500];
    for msg in ["one", "two", "three"] {
        client
            .send_to(msg.as_bytes(), ("127.0.0.1", plain))
            .await
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], msg.as_bytes());
    }
    // One session for all three datagrams; it ends after 300 ms idle and is logged.
    wait_for("udp session log", Duration::from_secs(3), || {
        log.exists() && std::fs::read_to_string(&log).unwrap().lines().count() == 1
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().trim(),
        "UDP 127.0.0.1 200 11 11"
    );

    client.send_to(b"dns?", ("127.0.0.1", pp)).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&buf[..n]), format!("{me}|dns?"));
    // proxy_responses 1: the session is over after its answer.
    wait_for("udp sessions to end", Duration::from_secs(3), || {
        lb.shared().sessions.is_empty()
    })
    .await;
}

/// Answers `PONG` to `PING` (a health endpoint on its own port).
async fn ping_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 6];
                if s.read_exact(&mut buf).await.is_ok() && &buf == b"PING\r\n" {
                    let _ = s.write_all(b"+PONG\r\n").await;
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_health_check_port_and_send_expect() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let (ping, ping_task) = ping_server().await;
    let port = free_port();
    // Both peers are checked on the ping port; only the check decides health.
    let lb = start(
        dir.path(),
        &format!(
            "stream {{
  match pong {{ send \"PING\\r\\n\"; expect ~ \"^\\+PONG\"; }}
  upstream app {{ server {}; server {}; }}
  server {{ listen 127.0.0.1:{port}; proxy_pass app; health_check interval=100ms fails=1 passes=1 port={} match=pong; }}
}}",
            a.addr,
            b.addr,
            ping.port()
        ),
    );
    let healthy = |lb: &lb::Balancer| {
        let gen = lb.shared().current();
        gen.upstreams[0]
            .peers()
            .iter()
            .map(|p| p.healthy.load(Ordering::Relaxed))
            .collect::<Vec<_>>()
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(healthy(&lb), [true, true]);
    ping_task.abort();
    wait_for(
        "checks on the health port to fail",
        Duration::from_secs(3),
        || healthy(&lb) == [false, false],
    )
    .await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        greeting(addr).await.is_err(),
        "no healthy peer: the session must fail"
    );
    let _ping = tokio::net::TcpListener::bind(ping).await.unwrap();
    // A listener that never answers PONG keeps them down (expect fails).
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(healthy(&lb), [false, false]);
}

fn servers(body: &str) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let list = if v.is_array() { &v } else { &v["servers"] };
    list.as_array().unwrap().clone()
}

/// Greetings of `n` new sessions through `addr`, counted by backend name.
async fn spread(addr: SocketAddr, n: usize) -> std::collections::BTreeMap<String, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        *seen.entry(greeting(addr).await.unwrap()).or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_health_state_survives_reload_and_api_adds_and_removes_servers() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (Backend::start("one").await, Backend::start("two").await);
    let (port, one_addr, two_addr) = (free_port(), one.addr, two.addr);
    let api = dir.path().join("api.sock");
    let text = |check: &str| {
        format!(
            "stream {{
  runtime_api unix:{};
  match greets {{ expect ~ \"^(one|two|three)\"; }}
  upstream app {{ server {}; server {}; }}
  server {{ listen 127.0.0.1:{port}; proxy_pass app; proxy_connect_timeout 1s; health_check {check} match=greets; }}
}}",
            api.display(),
            one_addr, two_addr
        )
    };
    let mut lb = start(dir.path(), &text("interval=100ms fails=1 passes=1"));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for("api socket", Duration::from_secs(5), || api.exists()).await;
    assert_eq!(spread(addr, 4).await.len(), 2);
    two.stop().await;
    for _ in 0..100 {
        if state(&api, 1).await == "unhealthy" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state(&api, 1).await, "unhealthy");
    let (_, before) = http(&api, "GET", "/api/upstreams/app/servers/0", "").await;
    let served_by_one = serde_json::from_str::<serde_json::Value>(&before).unwrap()["connections"]
        .as_u64()
        .unwrap();

    // Reload with slower checks: fresh state would call "two" up for seconds.
    lb.reload(config(dir.path(), &text("interval=10s fails=3 passes=2")))
        .unwrap();
    assert_eq!(state(&api, 1).await, "unhealthy", "health reset by reload");
    assert_eq!(spread(addr, 6).await.get("one"), Some(&6));
    let (_, after) = http(&api, "GET", "/api/upstreams/app/servers/0", "").await;
    let after: serde_json::Value = serde_json::from_str(&after).unwrap();
    assert_eq!(after["connections"].as_u64().unwrap(), served_by_one + 6);
    // Back on the faster checks: two passes bring it up again.
    lb.reload(config(dir.path(), &text("interval=100ms fails=3 passes=2")))
        .unwrap();
    let _two = Backend::at("two", two_addr).await;
    for _ in 0..100 {
        if state(&api, 1).await == "up" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state(&api, 1).await, "up", "not up after passes");

    // Add a server (nginx Plus's path and fields), then remove one.
    let three = Backend::start("three").await;
    let (code, body) = http(
        &api,
        "POST",
        "/api/9/stream/upstreams/app/servers",
        &format!(r#"{{"server":"{}","weight":2}}"#, three.addr),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let added: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (added["id"].as_u64(), added["weight"].as_u64()),
        (Some(2), Some(2))
    );
    let to_three = spread(addr, 12).await.get("three").copied();
    assert!(
        matches!(to_three, Some(5..=7)),
        "weight 2 of 4 got {to_three:?} of 12"
    );
    let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
    let held_by = read_line(&mut held).await.unwrap();
    let held_id = ["one", "two", "three"]
        .iter()
        .position(|n| *n == held_by)
        .unwrap();
    let (code, body) = http(
        &api,
        "DELETE",
        &format!("/api/upstreams/app/servers/{held_id}"),
        "",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(servers(&body).len(), 2);
    assert!(!spread(addr, 8).await.contains_key(&held_by));
    held.write_all(b"still served").await.unwrap();
    let mut buf = [0u8; 12];
    held.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still served", "removal cut an open session");

    for (method, path, body, want) in [
        (
            "POST",
            "/api/upstreams/app/servers",
            r#"{"server":"nowhere"}"#,
            400,
        ),
        (
            "POST",
            "/api/upstreams/app/servers",
            r#"{"server":"127.0.0.1:1","weight":0}"#,
            400,
        ),
        (
            "POST",
            "/api/upstreams/app/servers",
            r#"{"server":"127.0.0.1:1","color":1}"#,
            400,
        ),
        (
            "POST",
            "/api/upstreams/nope/servers",
            r#"{"server":"127.0.0.1:1"}"#,
            404,
        ),
        ("DELETE", "/api/upstreams/app/servers/77", "", 404),
        ("DELETE", "/api/upstreams/app/servers/x", "", 404),
    ] {
        assert_eq!(
            http(&api, method, path, body).await.0,
            want,
            "{method} {path} {body}"
        );
    }
    // Added as down: it never gets a session until set up.
    let four = Backend::start("four").await;
    let (code, body) = http(
        &api,
        "POST",
        "/api/upstreams/app/servers",
        &format!(r#"{{"server":"{}","down":true}}"#, four.addr),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let added: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(added["state"], "down", "{body}");
    spread(addr, 6).await;
    // The balancer's count: health checks also connect to the backend.
    let path = format!("/api/upstreams/app/servers/{}", added["id"]);
    let (_, body) = http(&api, "GET", &path, "").await;
    let four_now: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        four_now["connections"], 0,
        "a server added as down got a session"
    );
    // The file is the truth for which servers exist: a reload brings back
    // the removed one and drops the one the API added.
    lb.reload(config(dir.path(), &text("interval=100ms fails=3 passes=2")))
        .unwrap();
    let (_, body) = http(&api, "GET", "/api/upstreams/app/servers", "").await;
    let names: Vec<String> = servers(&body)
        .iter()
        .map(|s| s["server"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, [one_addr.to_string(), two_addr.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_draining_server_keeps_its_sessions_and_takes_no_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (Backend::start("one").await, Backend::start("two").await);
    let port = free_port();
    let api = dir.path().join("api.sock");
    let text = format!(
        "stream {{
  runtime_api unix:{};
  upstream app {{ server {}; server {}; }}
  server {{ listen 127.0.0.1:{port}; proxy_pass app; }}
}}",
        api.display(),
        one.addr,
        two.addr
    );
    let mut lb = start(dir.path(), &text);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for("api socket", Duration::from_secs(5), || api.exists()).await;
    let mut on_one = Vec::new();
    while on_one.len() < 3 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        if read_line(&mut s).await.unwrap() == "one" {
            on_one.push(s);
        }
    }
    let (code, _) = http(
        &api,
        "PATCH",
        "/api/upstreams/app/servers/0",
        r#"{"drain":true}"#,
    )
    .await;
    assert_eq!(code, 200);
    let server0 = || async {
        let (_, body) = http(&api, "GET", "/api/upstreams/app/servers/0", "").await;
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let s = server0().await;
    assert_eq!(
        (s["state"].as_str(), s["active"].as_u64()),
        (Some("draining"), Some(3))
    );
    let accepted = one.count();
    assert_eq!(spread(addr, 10).await.get("two"), Some(&10));
    assert_eq!(one.count(), accepted, "a draining server got a new session");
    // Draining is kept by a reload that leaves the server line alone.
    lb.reload(config(dir.path(), &text)).unwrap();
    assert_eq!(spread(addr, 4).await.get("two"), Some(&4));
    for (i, s) in on_one.iter_mut().enumerate() {
        let msg = format!("session {i}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, msg.as_bytes(), "draining cut an open session");
    }
    drop(on_one);
    for _ in 0..100 {
        if server0().await["active"].as_u64() == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = server0().await;
    assert_eq!(
        (s["state"].as_str(), s["active"].as_u64()),
        (Some("draining"), Some(0))
    );
    let (code, _) = http(
        &api,
        "PATCH",
        "/api/upstreams/app/servers/0",
        r#"{"drain":false}"#,
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(
        spread(addr, 4).await.len(),
        2,
        "undrained server gets sessions again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_udp_listen_accepts_proxy_v2_and_passes_the_client_on() {
    let dir = tempfile::tempdir().unwrap();
    let backend = udp_backend().await;
    let (front, trusting, untrusting) = (free_udp_port(), free_udp_port(), free_udp_port());
    let log = dir.path().join("pp.log");
    // front sends PROXY v2 to `trusting`, which takes the client from it and
    // sends it on to the backend; `untrusting` logs it but keeps the peer.
    let lb = start(
        dir.path(),
        &format!(
            "stream {{
  log_format pp '$server_port $remote_addr:$remote_port $proxy_protocol_addr:$proxy_protocol_port $realip_remote_addr';
  proxy_timeout 300ms;
  server {{ listen 127.0.0.1:{front} udp; proxy_pass 127.0.0.1:{trusting}; proxy_protocol on; }}
  server {{
    listen 127.0.0.1:{trusting} udp proxy_protocol;
    set_real_ip_from 127.0.0.1;
    proxy_pass {backend};
    proxy_protocol on;
    access_log {0} pp;
  }}
  server {{ listen 127.0.0.1:{untrusting} udp proxy_protocol; proxy_pass {backend}; access_log {0} pp; }}
}}",
            log.display()
        ),
    );
    let client = UdpSocket::bind("127.0.0.9:0").await.unwrap();
    let me = client.local_addr().unwrap();
    let mut buf = [0u8; 1500];
    let ask = |to: u16, msg: Vec<u8>| {
        let client = &client;
        async move {
            client.send_to(&msg, ("127.0.0.1", to)).await.unwrap();
            tokio::time::timeout(Duration::from_millis(500), client.recv(&mut buf))
                .await
                .ok()
                .map(|n| String::from_utf8_lossy(&buf[..n.unwrap()]).into_owned())
        }
    };
    for msg in ["a?", "b?"] {
        assert_eq!(
            ask(front, msg.into()).await.as_deref(),
            Some(format!("{me}|{msg}").as_str()),
            "the client address did not survive two hops"
        );
    }
    // Hand-made headers for two sources multiplexed on one socket.
    let claimed = |ip: &str| -> std::net::SocketAddr { format!("{ip}:5353").parse().unwrap() };
    let dst: std::net::SocketAddr = format!("127.0.0.1:{untrusting}").parse().unwrap();
    for ip in ["192.0.2.1", "192.0.2.2"] {
        let mut d = lb::proxy_protocol::encode_v2(claimed(ip), dst, true);
        d.extend_from_slice(ip.as_bytes());
        assert_eq!(ask(untrusting, d).await.as_deref(), Some(ip));
    }
    let errors = || {
        lb.shared()
            .stats
            .proxy_protocol_errors
            .load(Ordering::Relaxed)
    };
    let before = errors();
    let v1 = lb::proxy_protocol::encode_v1(claimed("192.0.2.3"), dst);
    let mut cut = lb::proxy_protocol::encode_v2(claimed("192.0.2.4"), dst, true);
    cut.truncate(20);
    for bad in [b"no header".to_vec(), v1, cut] {
        assert_eq!(
            ask(untrusting, bad).await,
            None,
            "a bad datagram was answered"
        );
    }
    assert_eq!(errors(), before + 3);
    let mut d = lb::proxy_protocol::encode_v2(claimed("192.0.2.1"), dst, true);
    d.extend_from_slice(b"again");
    assert_eq!(ask(untrusting, d).await.as_deref(), Some("again"));

    wait_for(
        "udp sessions to end and log",
        Duration::from_secs(5),
        || lb.shared().sessions.is_empty(),
    )
    .await;
    let mut lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    // The "again" datagram came after the first 192.0.2.1 session had idled out.
    let from_me = format!("127.0.0.9:{}", me.port());
    let mut want = vec![
        format!("{trusting} {from_me} {from_me} 127.0.0.1"),
        format!("{untrusting} {from_me} 192.0.2.1:5353 127.0.0.9"),
        format!("{untrusting} {from_me} 192.0.2.1:5353 127.0.0.9"),
        format!("{untrusting} {from_me} 192.0.2.2:5353 127.0.0.9"),
    ];
    want.sort();
    assert_eq!(lines, want, "one session per client and PROXY source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_udp_sessions_count_against_worker_connections() {
    let dir = tempfile::tempdir().unwrap();
    let backend = udp_backend().await;
    let port = free_udp_port();
    let lb = start(
        dir.path(),
        &format!(
            "events {{ worker_connections 2; }}
stream {{ server {{ listen 127.0.0.1:{port} udp proxy_protocol; proxy_pass {backend}; proxy_timeout 1s; }} }}"
        ),
    );
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dst: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // One socket claiming five sources: only two sessions fit.
    let mut answered = 0;
    for i in 1..=5 {
        let src: SocketAddr = format!("192.0.2.{i}:53").parse().unwrap();
        let mut d = lb::proxy_protocol::encode_v2(src, dst, true);
        d.extend_from_slice(b"q");
        client.send_to(&d, dst).await.unwrap();
        let mut buf = [0u8; 64];
        if tokio::time::timeout(Duration::from_millis(100), client.recv(&mut buf))
            .await
            .is_ok()
        {
            answered += 1;
        }
    }
    assert_eq!(answered, 2);
    let stats = &lb.shared().stats;
    assert_eq!(stats.over_capacity.load(Ordering::Relaxed), 3);
    // Once they idle out, there is room again.
    wait_for("sessions to end", Duration::from_secs(3), || {
        lb.shared().sessions.is_empty()
    })
    .await;
    let mut d = lb::proxy_protocol::encode_v2("192.0.2.9:53".parse().unwrap(), dst, true);
    d.extend_from_slice(b"again");
    client.send_to(&d, dst).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), client.recv(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"again");
}

/// (id, weight, state) of each server, as the API lists them.
async fn server_table(api: &std::path::Path) -> Vec<(u64, u64, String)> {
    let (_, body) = http(api, "GET", "/api/upstreams/app", "").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_u64().unwrap(),
                s["weight"].as_u64().unwrap(),
                s["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// nginx Plus's `state FILE`: what the API changes (weight, drain, down,
/// servers added and removed) goes to the file at once and is read back by a
/// reload (ids and counters stay with the servers) and by a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_state_file_keeps_api_changes_across_reload_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two, three) = (
        Backend::start("one").await,
        Backend::start("two").await,
        Backend::start("three").await,
    );
    let port = free_port();
    let state = dir.path().join("app.state");
    std::fs::write(
        &state,
        format!("server {} weight=2;\nserver {};\n", one.addr, two.addr),
    )
    .unwrap();
    let conf = |api: &std::path::Path| {
        format!(
            "stream {{
  runtime_api unix:{};
  upstream app {{ zone app 64k; state app.state; }}
  server {{ listen 127.0.0.1:{port}; proxy_pass app; }}
}}",
            api.display()
        )
    };
    let api = dir.path().join("api.sock");
    let mut lb = start(dir.path(), &conf(&api));
    wait_for("api socket", Duration::from_secs(5), || api.exists()).await;
    assert_eq!(
        server_table(&api).await,
        [(0, 2, "up".into()), (1, 1, "up".into())]
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(greeting(addr).await.unwrap(), "one");

    let patch = r#"{"weight":3,"drain":true}"#;
    assert_eq!(
        http(&api, "PATCH", "/api/upstreams/app/servers/1", patch)
            .await
            .0,
        200
    );
    let add = format!(r#"{{"server":"{}","weight":4}}"#, three.addr);
    assert_eq!(
        http(&api, "POST", "/api/upstreams/app/servers", &add)
            .await
            .0,
        201
    );
    assert_eq!(
        http(&api, "DELETE", "/api/upstreams/app/servers/0", "")
            .await
            .0,
        200
    );
    assert_eq!(
        std::fs::read_to_string(&state).unwrap(),
        format!(
            "server {} weight=3 max_fails=1 fail_timeout=10s max_conns=0 drain;\n\
             server {} weight=4 max_fails=1 fail_timeout=10s max_conns=0;\n",
            two.addr, three.addr
        )
    );
    let changed = vec![(1, 3, "draining".to_string()), (2, 4, "up".to_string())];
    assert_eq!(server_table(&api).await, changed);
    let sessions_on_three = connections(&api, 1).await;

    // A reload reads the file back: same servers, ids, state and counters.
    lb.reload(config(dir.path(), &conf(&api))).unwrap();
    assert_eq!(server_table(&api).await, changed);
    assert_eq!(connections(&api, 1).await, sessions_on_three);
    for _ in 0..3 {
        assert_eq!(greeting(addr).await.unwrap(), "three", "two is draining");
    }
    let (code, _) = http(
        &api,
        "PATCH",
        "/api/upstreams/app/servers/2",
        r#"{"down":true}"#,
    )
    .await;
    assert_eq!(code, 200);
    drop(lb);

    // A restart too (ids start again from 0, in file order).
    let api2 = dir.path().join("api2.sock");
    let _lb = start(dir.path(), &conf(&api2));
    wait_for("api socket", Duration::from_secs(5), || api2.exists()).await;
    assert_eq!(
        server_table(&api2).await,
        [(0, 3, "draining".into()), (1, 4, "down".into())]
    );
    assert!(closed_without_data(&mut tokio::net::TcpStream::connect(addr).await.unwrap()).await);
}

#[test]
fn state_file_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let load = |conf: &str, state: &str| {
        std::fs::write(dir.path().join("app.state"), state).unwrap();
        let path = dir.path().join("lb.conf");
        std::fs::write(&path, conf).unwrap();
        lb::Config::load(&path).unwrap_err().to_string()
    };
    let with_state = "stream {\n  upstream app {\n    state app.state;\n  }\n  server { listen 127.0.0.1:1; proxy_pass app; }\n}\n";
    let both = with_state.replace(
        "state app.state;",
        "state app.state;\n    server 127.0.0.1:2;",
    );
    let e = load(&both, "");
    assert!(e.contains("lb.conf:4") && e.contains("\"state\""), "{e}");
    let e = load(
        with_state,
        "server 127.0.0.1:2;\nserver 127.0.0.1:3 weight=0;\n",
    );
    assert!(e.contains("app.state:2") && e.contains("weight"), "{e}");
    let e = load(with_state, "listen 80;\n");
    assert!(
        e.contains("app.state:1") && e.contains("only \"server\""),
        "{e}"
    );
    let e = load(with_state, "server 127.0.0.1:2 slow_start=10s;\n");
    assert!(e.contains("app.state:1") && e.contains("slow_start"), "{e}");
}
