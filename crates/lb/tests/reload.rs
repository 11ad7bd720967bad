//! Reload under load (in process and through SIGHUP), SIGQUIT drain, SIGTERM.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn two_server_config(port: u16, extra: u16, backend: std::net::SocketAddr) -> String {
    format!(
        "stream {{
  server {{ listen 127.0.0.1:{port}; proxy_pass {backend}; }}
  server {{ listen 127.0.0.1:{extra}; proxy_pass {backend}; }}
}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_reload_under_load_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (Backend::start("old").await, Backend::start("new").await);
    let (port, extra_a, extra_b) = (free_port(), free_port(), free_port());
    let mut lb = start(dir.path(), &two_server_config(port, extra_a, old.addr));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();

    // A long session opened before any reload.
    let mut long = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut long).await.unwrap(), "old");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match greeting(addr).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (backend, extra) = if i % 2 == 1 {
            (new.addr, extra_b)
        } else {
            (old.addr, extra_a)
        };
        lb.reload(config(dir.path(), &two_server_config(port, extra, backend)))
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed during reloads",
        ok + failed
    );
    assert!(ok > 100, "only {ok} connections in 1.6 s");
    assert!(new.count() > 0 && old.count() > 0);
    // The last config points at "new" and listens on extra_b, not extra_a.
    assert_eq!(greeting(addr).await.unwrap(), "new");
    assert_eq!(
        greeting(format!("127.0.0.1:{extra_b}").parse().unwrap())
            .await
            .unwrap(),
        "new"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", extra_a)).await.is_err(),
        "removed listener still open"
    );
    // The session from before the reloads still works.
    long.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    long.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    // A broken config is refused and the running one stays.
    let broken = dir.path().join("broken.conf");
    std::fs::write(
        &broken,
        "stream { server { listen 127.0.0.1:1; proxy_pass nowhere; } }",
    )
    .unwrap();
    assert!(lb::Config::load(&broken).is_err());
    assert_eq!(greeting(addr).await.unwrap(), "new");
}

/// Runs `oxvirt lb`'s main loop on a thread, as the binary would.
fn run_in_thread(path: std::path::PathBuf) -> std::thread::JoinHandle<Result<u8, lb::RunError>> {
    std::thread::spawn(move || lb::run_file(&path))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_signals_hup_reloads_quit_drains_term_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let path = dir.path().join("lb.conf");
    let pid_file = dir.path().join("lb.pid");
    let write = |backend: std::net::SocketAddr, port: u16| {
        let text = format!(
            "pid {};\nworker_processes 2;\nstream {{ server {{ listen 127.0.0.1:{port}; proxy_pass {backend}; }} }}\n",
            pid_file.display()
        );
        std::fs::write(&path, text).unwrap();
    };
    let me = Pid::this();

    write(a.addr, addr.port());
    let thread = run_in_thread(path.clone());
    wait_for("pid file", Duration::from_secs(10), || pid_file.exists()).await;
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        std::process::id().to_string()
    );
    assert_eq!(greeting(addr).await.unwrap(), "a");
    let mut session = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut session).await.unwrap(), "a");

    write(b.addr, addr.port());
    kill(me, Signal::SIGHUP).unwrap();
    for _ in 0..100 {
        if greeting(addr).await.unwrap() == "b" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(greeting(addr).await.unwrap(), "b", "SIGHUP did not reload");

    // SIGQUIT: listeners close at once, the open session drains, then exit.
    kill(me, Signal::SIGQUIT).unwrap();
    wait_for("listener to close", Duration::from_secs(5), || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    session.write_all(b"drain").await.unwrap();
    let mut buf = [0u8; 5];
    session.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"drain");
    assert!(!thread.is_finished(), "exited before the session drained");
    drop(session);
    wait_for("exit after drain", Duration::from_secs(5), || {
        thread.is_finished()
    })
    .await;
    assert_eq!(thread.join().unwrap().unwrap(), 0);
    assert!(!pid_file.exists(), "pid file left behind");

    // SIGTERM: open sessions are closed, the process exits promptly. A new
    // port: the old one may have gone to some socket's ephemeral end meanwhile.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    write(b.addr, addr.port());
    let thread = run_in_thread(path.clone());
    wait_for("pid file", Duration::from_secs(10), || pid_file.exists()).await;
    let mut session = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_line(&mut session).await.unwrap(), "b");
    kill(me, Signal::SIGTERM).unwrap();
    assert!(closed_without_data(&mut session).await);
    wait_for("exit on SIGTERM", Duration::from_secs(5), || {
        thread.is_finished()
    })
    .await;
    assert_eq!(thread.join().unwrap().unwrap(), 0);
}

/// GET /api/stats over the runtime API's unix socket.
async fn api_stats(api: &std::path::Path) -> serde_json::Value {
    let mut s = tokio::net::UnixStream::connect(api).await.unwrap();
    s.write_all(b"GET /api/stats HTTP/1.1\r\nHost: lb\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap()
}

/// Echoes a numbered message through a long session; false on any failure.
async fn ping(s: &mut TcpStream, n: u64) -> bool {
    let msg = format!("ping {n:08}\n");
    let mut buf = vec![0u8; msg.len()];
    let round = async {
        s.write_all(msg.as_bytes()).await?;
        s.read_exact(&mut buf).await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), round).await,
        Ok(Ok(_))
    ) && buf == msg.as_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_sighup_reloads_under_load_keep_long_sessions_and_refuse_nothing() {
    const LONG: usize = 64;
    const RELOADS: u64 = 6;
    let dir = tempfile::tempdir().unwrap();
    let backends = [Backend::start("a").await, Backend::start("b").await];
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (path, pid_file, api) = (
        dir.path().join("lb.conf"),
        dir.path().join("lb.pid"),
        dir.path().join("api.sock"),
    );
    let write = |generation: u64| {
        let backend = backends[(generation % 2) as usize].addr;
        let text = format!(
            "pid {};\nworker_processes 2;\nstream {{\n  runtime_api unix:{};\n  proxy_timeout {}s;\n  upstream app {{ server {backend}; }}\n  server {{ listen 127.0.0.1:{port} backlog=64; proxy_pass app; }}\n}}\n",
            pid_file.display(),
            api.display(),
            60 + generation
        );
        std::fs::write(&path, text).unwrap();
    };
    write(0);
    let thread = run_in_thread(path.clone());
    wait_for("pid file", Duration::from_secs(10), || pid_file.exists()).await;
    wait_for("api socket", Duration::from_secs(5), || api.exists()).await;

    let mut long = Vec::new();
    for _ in 0..LONG {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(read_line(&mut s).await.unwrap(), "a");
        long.push(s);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, pings) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    // Long sessions keep talking through every reload.
    let mut talkers = Vec::new();
    for mut s in long {
        let (stop, pings) = (stop.clone(), pings.clone());
        talkers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                if !ping(&mut s, n).await {
                    return Err(format!("long session failed after {n} pings"));
                }
                n += 1;
                pings.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(s)
        }));
    }
    // A stream of new sessions.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match greeting(addr).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for generation in 1..=RELOADS {
        tokio::time::sleep(Duration::from_millis(150)).await;
        write(generation);
        kill(Pid::this(), Signal::SIGHUP).unwrap();
        let mut reloads = 0;
        for _ in 0..250 {
            reloads = api_stats(&api).await["reloads"].as_u64().unwrap();
            if reloads == generation {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(reloads, generation, "SIGHUP {generation} not applied");
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let mut long = Vec::new();
    for t in talkers {
        long.push(t.await.unwrap().unwrap());
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(failed, 0, "{failed} of {} new sessions failed", ok + failed);
    assert!(ok > 100, "only {ok} new sessions during {RELOADS} reloads");
    assert!(pings.load(Ordering::Relaxed) >= (LONG as u64) * 5);
    // Every long session, opened on generation 0, still works on generation 6.
    for (i, s) in long.iter_mut().enumerate() {
        assert!(ping(s, 1_000_000 + i as u64).await, "long session {i}");
    }
    assert_eq!(
        greeting(addr).await.unwrap(),
        "a",
        "last config not in effect"
    );
    // The probe sessions above end on their own; the long ones stay.
    let mut active = None;
    for _ in 0..100 {
        active = api_stats(&api).await["active_sessions"].as_u64();
        if active == Some(LONG as u64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(active, Some(LONG as u64));
    drop(long);
    kill(Pid::this(), Signal::SIGTERM).unwrap();
    wait_for("exit on SIGTERM", Duration::from_secs(5), || {
        thread.is_finished()
    })
    .await;
    assert_eq!(thread.join().unwrap().unwrap(), 0);
}
