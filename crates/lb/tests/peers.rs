//! Real peers: nginx (Debian package) as a realip backend receiving PROXY v1
//! and v2 from us (the nginx stream seed's scenario 3), and HAProxy sending
//! PROXY v2 into us.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A peer process that is killed when the test ends.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: an nginx master stops its workers on SIGTERM.
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

/// nginx HTTP on `port` with `listen ... proxy_protocol` and realip, logging
/// `$remote_addr|$proxy_protocol_addr|$realip_remote_addr`.
fn nginx_realip(nginx: &Path, dir: &Path, port: u16) -> (Peer, PathBuf) {
    let d = dir.display();
    let log = dir.join("web_access.log");
    let conf = format!(
        "worker_processes 1;
error_log {d}/error.log;
pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  log_format realip '$remote_addr|$proxy_protocol_addr|$realip_remote_addr';
  server {{
    listen 127.0.0.1:{port} proxy_protocol;
    set_real_ip_from 127.0.0.1;
    real_ip_header proxy_protocol;
    access_log {} realip;
    location / {{ return 200 \"web01 remote_addr: $remote_addr\\n\"; }}
  }}
}}
",
        log.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new(nginx)
        .args([
            "-p",
            &d.to_string(),
            "-c",
            &format!("{d}/nginx.conf"),
            "-g",
            "daemon off;",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    (Peer(child), log)
}

async fn wait_port(port: u16) {
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("nothing listens on {port}");
}

/// GET / from a chosen loopback source address; returns the body.
async fn get_from(src: &str, port: u16) -> String {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let mut s = sock
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nHost: www.etiantian.org\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

fn last_log_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_nginx_realip_backend_sees_client_through_proxy_protocol_v1_and_v2() {
    let Some(nginx) = require_binary("nginx") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let web = free_port();
    let (_nginx, web_log) = nginx_realip(&nginx, dir.path(), web);
    let (v1, v2) = (free_port(), free_port());
    let _lb = start(
        dir.path(),
        &format!(
            "stream {{
  upstream proxy_7 {{ server 127.0.0.1:{web}; }}
  server {{ listen 127.0.0.1:{v1}; proxy_pass proxy_7; proxy_protocol on; }}
  server {{ listen 127.0.0.1:{v2}; proxy_pass proxy_7; proxy_protocol on; proxy_protocol_version 2; }}
}}"
        ),
    );
    wait_port(web).await;
    for (port, client) in [(v1, "127.0.0.51"), (v2, "127.0.0.52")] {
        let body = get_from(client, port).await;
        assert!(
            body.contains(&format!("web01 remote_addr: {client}")),
            "{body}"
        );
        assert_eq!(
            last_log_line(&web_log),
            format!("{client}|{client}|127.0.0.1")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_haproxy_sends_proxy_v2_into_us_and_the_client_survives_to_nginx() {
    let Some(nginx) = require_binary("nginx") else {
        return;
    };
    let Some(haproxy) = require_binary("haproxy") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let web = free_port();
    let (_nginx, web_log) = nginx_realip(&nginx, dir.path(), web);
    let (front, ours) = (free_port(), free_port());
    let lb_log = dir.path().join("lb_access.log");
    let _lb = start(
        dir.path(),
        &format!(
            "stream {{
  log_format pp '$remote_addr $proxy_protocol_addr $realip_remote_addr';
  server {{
    listen 127.0.0.1:{ours} proxy_protocol;
    set_real_ip_from 127.0.0.1;
    proxy_pass 127.0.0.1:{web};
    proxy_protocol on;
    access_log {} pp;
  }}
}}",
            lb_log.display()
        ),
    );
    let hap_conf = dir.path().join("haproxy.cfg");
    std::fs::write(
        &hap_conf,
        format!(
            "defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:{front}
  default_backend be
backend be
  server lb 127.0.0.1:{ours} send-proxy-v2
"
        ),
    )
    .unwrap();
    let _haproxy = Peer(
        Command::new(haproxy)
            .args(["-db", "-f"])
            .arg(&hap_conf)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(web).await;
    wait_port(front).await;
    let body = get_from("127.0.0.77", front).await;
    assert!(body.contains("web01 remote_addr: 127.0.0.77"), "{body}");
    assert_eq!(last_log_line(&web_log), "127.0.0.77|127.0.0.77|127.0.0.1");
    // Our own log: the port probes above also passed through, so look for the line.
    let want = "127.0.0.77 127.0.0.77 127.0.0.1";
    wait_for("our access log line", Duration::from_secs(5), || {
        std::fs::read_to_string(&lb_log)
            .unwrap_or_default()
            .lines()
            .any(|l| l == want)
    })
    .await;
}
