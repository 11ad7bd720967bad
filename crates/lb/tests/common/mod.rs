//! Shared test helpers: free ports, small backends, a balancer from config text.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lb::{Balancer, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `text` as `lb.conf` in `dir` and loads it.
pub fn config(dir: &Path, text: &str) -> Config {
    let path = dir.join("lb.conf");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

pub fn start(dir: &Path, text: &str) -> Balancer {
    start_with(dir, text, true)
}

/// A balancer on the io_uring engine (`io_uring`, where the kernel has it)
/// or on epoll.
pub fn start_with(dir: &Path, text: &str, io_uring: bool) -> Balancer {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("info")
        .try_init();
    Balancer::start_with(config(dir, text), io_uring).unwrap()
}

/// Loud skip when io_uring is unavailable; fails instead under OXVIRT_REQUIRE_KVM=1.
pub fn require_io_uring(lb: &Balancer) -> bool {
    if lb.uses_io_uring() {
        return true;
    }
    if std::env::var("OXVIRT_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("the io_uring engine did not start (OXVIRT_REQUIRE_KVM=1); see the log for why");
    }
    eprintln!("!!!!!! SKIP: io_uring is unavailable here; only the epoll engine was tested !!!!!!");
    false
}

/// A backend that greets with `NAME\n`, then echoes; counts accepted connections.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Self::on(name, TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    pub async fn at(name: &str, addr: SocketAddr) -> Backend {
        Self::on(name, TcpListener::bind(addr).await.unwrap())
    }

    fn on(name: &str, listener: TcpListener) -> Backend {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let greeting = format!("{name}\n").into_bytes();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::Relaxed);
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    if s.write_all(&greeting).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Backend {
            addr,
            accepted,
            task,
        }
    }

    pub fn count(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Stops listening (new connections are refused once this returns;
    /// a connection queued before is reset); open ones keep going.
    pub async fn stop(self) -> SocketAddr {
        self.task.abort();
        let _ = self.task.await;
        self.addr
    }
}

/// Connects through the balancer and returns the backend's greeting.
pub async fn greeting(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    read_line(&mut s).await
}

pub async fn read_line(s: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no greeting"))??;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before greeting",
            ));
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b[0]);
    }
}

/// True when the balancer closed the connection without sending anything.
pub async fn closed_without_data(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Loud skip for a missing peer binary; fails instead under OXVIRT_REQUIRE_KVM=1.
pub fn require_binary(name: &str) -> Option<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Some(p);
        }
    }
    if std::env::var("OXVIRT_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{name} is required (OXVIRT_REQUIRE_KVM=1) but not installed; run scripts/setup.sh");
    }
    eprintln!("!!!!!! SKIP: {name} is not installed; run scripts/setup.sh to install it !!!!!!");
    None
}

pub async fn wait_for<F: Fn() -> bool>(what: &str, timeout: Duration, f: F) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
