//! Load generator and sink backend for bench/lb.sh (one thread, pin it with taskset).
//!
//! ```text
//! lbload sink ADDR              accept and discard everything (a bulk backend)
//! lbload bulk ADDR CONNS SECS   push data through CONNS connections; prints GB/s
//! lbload conns ADDR CONC SECS   short HTTP/1.0 sessions, CONC at a time; prints sessions/s
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn usage() -> ! {
    eprintln!("usage: lbload sink ADDR | bulk ADDR CONNS SECS | conns ADDR CONC SECS");
    std::process::exit(2)
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mode = args.get(1).map(String::as_str).unwrap_or_else(|| usage());
    let addr: SocketAddr = arg(&args, 2);
    match mode {
        "sink" => rt.block_on(sink(addr)),
        "bulk" => rt.block_on(bulk(
            addr,
            arg(&args, 3),
            Duration::from_secs(arg(&args, 4)),
        )),
        "conns" => rt.block_on(conns(
            addr,
            arg(&args, 3),
            Duration::from_secs(arg(&args, 4)),
        )),
        _ => usage(),
    }
}

async fn sink(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).await.expect("bind");
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
}

async fn bulk(addr: SocketAddr, conns: usize, secs: Duration) {
    let sent = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + secs;
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let sent = sent.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let buf = vec![0x5au8; 256 * 1024];
            while Instant::now() < deadline {
                if s.write_all(&buf).await.is_err() {
                    return;
                }
                sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let gbps = sent.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64() / 1e9;
    println!("{gbps:.3}");
}

async fn conns(addr: SocketAddr, conc: usize, secs: Duration) {
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = Instant::now() + secs;
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let (done, failed) = (done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while Instant::now() < deadline {
                match one_session(addr, &mut buf).await {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let start = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    println!("{rate:.0} {}", failed.load(Ordering::Relaxed));
}

async fn one_session(addr: SocketAddr, buf: &mut [u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut got = 0;
    loop {
        let n = s.read(buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "empty response",
        ));
    }
    Ok(())
}
