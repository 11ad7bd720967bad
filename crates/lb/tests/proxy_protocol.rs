//! PROXY protocol in and out, and hostile clients on a `listen ... proxy_protocol`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use lb::proxy_protocol::{encode_v1, encode_v2, read_header};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that reads a PROXY header and answers with the source it names.
async fn pp_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let reply = match read_header(&mut s, Duration::from_secs(5)).await {
                    Ok((h, _)) => {
                        format!("{}\n", h.source.map_or("none".into(), |a| a.to_string()))
                    }
                    Err(e) => format!("error {e}\n"),
                };
                let _ = s.write_all(reply.as_bytes()).await;
            });
        }
    });
    addr
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_proxy_protocol_in_v1_v2_realip_and_out_v1_v2() {
    let dir = tempfile::tempdir().unwrap();
    let backend = pp_backend().await;
    let (v1_out, v2_out, trusted, untrusted) = (free_port(), free_port(), free_port(), free_port());
    let _lb = start(
        dir.path(),
        &format!(
            "stream {{
  server {{ listen 127.0.0.1:{v1_out}; proxy_pass {backend}; proxy_protocol on; }}
  server {{ listen 127.0.0.1:{v2_out}; proxy_pass {backend}; proxy_protocol on; proxy_protocol_version 2; }}
  server {{ listen 127.0.0.1:{trusted} proxy_protocol; set_real_ip_from 127.0.0.0/8; proxy_pass {backend}; proxy_protocol on; }}
  server {{ listen 127.0.0.1:{untrusted} proxy_protocol; set_real_ip_from 10.0.0.0/8; proxy_pass {backend}; proxy_protocol on; }}
}}"
        ),
    );
    let from = |ip: &str| {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        s
    };
    for port in [v1_out, v2_out] {
        let mut s = from("127.0.0.3")
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
        let seen = read_line(&mut s).await.unwrap();
        assert!(
            seen.starts_with("127.0.0.3:"),
            "port {port}: backend saw {seen}"
        );
    }
    let real: SocketAddr = "203.0.113.9:4444".parse().unwrap();
    let dst: SocketAddr = "127.0.0.1:80".parse().unwrap();
    for header in [encode_v1(real, dst), encode_v2(real, dst, false)] {
        let mut s = TcpStream::connect(("127.0.0.1", trusted)).await.unwrap();
        s.write_all(&header).await.unwrap();
        assert_eq!(
            read_line(&mut s).await.unwrap(),
            real.to_string(),
            "trusted sender: realip applies"
        );
        let mut s = from("127.0.0.4")
            .connect(format!("127.0.0.1:{untrusted}").parse().unwrap())
            .await
            .unwrap();
        s.write_all(&header).await.unwrap();
        let seen = read_line(&mut s).await.unwrap();
        assert!(
            seen.starts_with("127.0.0.4:"),
            "untrusted sender must not set the address: {seen}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_hostile_proxy_protocol_clients_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start("served").await;
    let port = free_port();
    let lb = start(
        dir.path(),
        &format!(
            "stream {{
  proxy_protocol_timeout 1s;
  server {{ listen 127.0.0.1:{port} proxy_protocol backlog=4096; proxy_pass {}; }}
}}",
            backend.addr
        ),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let good = encode_v2("198.51.100.1:1000".parse().unwrap(), addr, false);
    let rss_before = rss_kib();

    // Slowloris: many clients that never finish (or never start) a header.
    let mut slow = Vec::new();
    for i in 0..400 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            s.write_all(b"PROXY TCP4 1.2.").await.unwrap();
        }
        slow.push(s);
    }
    // Garbage, missing, oversized v1 and v2 headers: closed at once.
    let hostile: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n".to_vec(),
        [b"PROXY TCP4 ".as_slice(), &[b'9'; 300]].concat(),
        [
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".as_slice(),
            &[0u8; 64],
        ]
        .concat(),
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x02ab".to_vec(),
    ];
    for bytes in &hostile {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        assert!(
            closed_without_data(&mut s).await,
            "{bytes:?} was not rejected"
        );
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "{bytes:?} was not rejected at once"
        );
    }
    // Everyone else is still served while the slow clients hang around.
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&good).await.unwrap();
        assert_eq!(read_line(&mut s).await.unwrap(), "served");
    }
    assert_eq!(
        backend.count(),
        20,
        "rejected clients must never reach the backend"
    );
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 64 * 1024,
        "400 slow clients grew memory by {grown} KiB"
    );
    // After proxy_protocol_timeout they are all gone.
    let t = Instant::now();
    for s in &mut slow {
        assert!(closed_without_data(s).await);
    }
    assert!(t.elapsed() < Duration::from_secs(3));
    wait_for("sessions to end", Duration::from_secs(5), || {
        lb.shared().sessions.is_empty()
    })
    .await;
    let errors = lb
        .shared()
        .stats
        .proxy_protocol_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(errors, 400 + hostile.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_payload_after_proxy_header_is_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start("echo").await;
    let port = free_port();
    let _lb = start(
        dir.path(),
        &format!(
            "stream {{ server {{ listen 127.0.0.1:{port} proxy_protocol; proxy_pass {}; }} }}",
            backend.addr
        ),
    );
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut first = encode_v1(
        "192.0.2.1:1".parse().unwrap(),
        "192.0.2.2:2".parse().unwrap(),
    );
    first.extend_from_slice(b"same-packet payload");
    s.write_all(&first).await.unwrap();
    assert_eq!(read_line(&mut s).await.unwrap(), "echo");
    let mut buf = vec![0u8; 19];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, b"same-packet payload");
}
