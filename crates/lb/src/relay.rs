//! Moving bytes between the client and the upstream: splice(2) through a pipe
//! when nothing needs to see the data, a buffered copy when a rate limit applies.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::fcntl::{splice, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes a pipe holds per splice round; large pipes mean fewer syscalls.
pub(crate) const PIPE_SIZE: usize = 1 << 20;
/// A direction starts with plain reads and writes through a buffer this
/// big: for the short messages most sessions carry, recv+send costs less
/// than two splices and a pipe. The first read that fills it switches the
/// direction to splice for good.
pub(crate) const SMALL_READ: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("idle for {0:?} (proxy_timeout)")]
    Idle(Duration),
    #[error("{side}: {source}")]
    Io {
        side: &'static str,
        source: io::Error,
    },
}

/// One direction's settings and counter.
pub struct Direction<'a> {
    pub from: &'a TcpStream,
    pub to: &'a TcpStream,
    /// Bytes per second, 0 = unlimited.
    pub rate: u64,
    pub bytes: &'a AtomicU64,
    pub side: &'static str,
}

pub struct Relay<'a> {
    pub up: Direction<'a>,
    pub down: Direction<'a>,
    pub idle: Duration,
    pub half_close: bool,
    pub buffer_size: usize,
}

/// Time of the last byte moved in either direction, for `proxy_timeout`.
struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

impl Relay<'_> {
    /// Runs until both sides are done (or one, without half-close) or the idle
    /// timeout fires. (A fast stop drops the whole session future.)
    pub async fn run(self) -> Result<(), RelayError> {
        let activity = Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
        };
        let transfer = async {
            let up = self.direction(&self.up, &activity);
            let down = self.direction(&self.down, &activity);
            tokio::pin!(up, down);
            if self.half_close {
                let (a, b) = tokio::join!(up, down);
                a.and(b)
            } else {
                tokio::select! {
                    r = &mut up => r,
                    r = &mut down => r,
                }
            }
        };
        let watchdog = async {
            loop {
                let deadline = activity.last() + self.idle;
                if Instant::now() >= deadline {
                    return RelayError::Idle(self.idle);
                }
                tokio::time::sleep_until(deadline.into()).await;
            }
        };
        tokio::select! {
            r = transfer => r,
            e = watchdog => Err(e),
        }
    }

    async fn direction(&self, d: &Direction<'_>, activity: &Activity) -> Result<(), RelayError> {
        let io_err = |source| RelayError::Io {
            side: d.side,
            source,
        };
        if d.rate == 0 {
            if copy_small(d, activity).await.map_err(io_err)? {
                splice_loop(d, activity).await.map_err(io_err)?;
            }
        } else {
            copy_loop(d, activity, self.buffer_size)
                .await
                .map_err(io_err)?;
        }
        if self.half_close {
            // The other way may still carry data: only close our write side.
            let _ = socket2::SockRef::from(d.to).shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }
}

/// Empty pipes kept for the next session: creating and growing a pipe costs
/// more than a short session's whole transfer.
static PIPES: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
const PIPES_KEPT: usize = 512;

/// A pipe (read end, write end) that goes back to the pool when known empty.
pub(crate) struct Pipe(pub(crate) OwnedFd, pub(crate) OwnedFd);

impl Pipe {
    pub(crate) fn take() -> io::Result<Pipe> {
        if let Some(p) = PIPES.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(p);
        }
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        // A bigger pipe is only an optimisation; the default 64 KiB also works.
        let _ = nix::fcntl::fcntl(
            w.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32),
        );
        Ok(Pipe(r, w))
    }

    /// Returns an empty pipe to the pool (a pipe holding data is just closed).
    pub(crate) fn give_back(self) {
        let mut pool = PIPES.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < PIPES_KEPT {
            pool.push(self);
        }
    }
}

/// Holds a pooled pipe for one direction; back to the pool on drop (also
/// when the session ends this direction early) if no bytes are left inside.
struct PipeLease {
    pipe: Option<Pipe>,
    empty: bool,
}

impl Drop for PipeLease {
    fn drop(&mut self) {
        if let (true, Some(pipe)) = (self.empty, self.pipe.take()) {
            pipe.give_back();
        }
    }
}

thread_local! {
    /// Small-read buffers kept for the next sessions on this thread: 4 KiB
    /// misses malloc's per-thread cache, and every session needs two.
    static SMALL_BUFS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}
const SMALL_BUFS_KEPT: usize = 256;

/// A pooled small-read buffer, on the heap: inside the session future it
/// would be copied with the future each time the future moves.
pub(crate) struct SmallBuf(pub(crate) Box<[u8]>);

impl SmallBuf {
    pub(crate) fn take() -> SmallBuf {
        let pooled = SMALL_BUFS.with(|pool| pool.borrow_mut().pop());
        SmallBuf(pooled.unwrap_or_else(|| vec![0u8; SMALL_READ].into_boxed_slice()))
    }
}

impl Drop for SmallBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        // try_with: the pool may already be gone while the thread exits.
        let _ = SMALL_BUFS.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < SMALL_BUFS_KEPT {
                pool.push(buf);
            }
        });
    }
}

/// Copies while reads come back short; `Ok(true)` once one filled the
/// buffer (bulk data: splice the rest), `Ok(false)` at end of stream.
async fn copy_small(d: &Direction<'_>, activity: &Activity) -> io::Result<bool> {
    let mut lease = SmallBuf::take();
    let buf = &mut lease.0;
    loop {
        let n = read_some(d.from, buf).await?;
        if n == 0 {
            return Ok(false);
        }
        write_all(d.to, &buf[..n]).await?;
        d.bytes.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
        if n == buf.len() {
            return Ok(true);
        }
    }
}

/// Zero-copy: socket -> pipe -> socket, both ends nonblocking under tokio's readiness.
async fn splice_loop(d: &Direction<'_>, activity: &Activity) -> io::Result<()> {
    let mut lease = PipeLease {
        pipe: Some(Pipe::take()?),
        empty: true,
    };
    let Some(Pipe(pipe_r, pipe_w)) = lease.pipe.as_ref() else {
        return Ok(());
    };
    let (pipe_r, pipe_w) = (pipe_r.as_fd(), pipe_w.as_fd());
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let n = loop {
            d.from.readable().await?;
            // A short splice drained the socket: report WouldBlock to tokio so
            // it clears readiness now, instead of paying one more EAGAIN splice.
            let mut moved = None;
            let r = d.from.try_io(Interest::READABLE, || {
                let n = splice(d.from.as_fd(), None, pipe_w, None, PIPE_SIZE, flags)?;
                moved = Some(n);
                if n > 0 && n < PIPE_SIZE {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match (r, moved) {
                (_, Some(n)) => break n,
                (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => continue,
                (Err(e), None) => return Err(e),
                (Ok(n), None) => break n,
            }
        };
        if n == 0 {
            return Ok(());
        }
        lease.empty = false;
        let mut left = n;
        while left > 0 {
            d.to.writable().await?;
            match d.to.try_io(Interest::WRITABLE, || {
                Ok(splice(pipe_r, None, d.to.as_fd(), None, left, flags)?)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        lease.empty = true;
        d.bytes.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}

/// Buffered copy that holds the average rate to `d.rate` bytes per second.
async fn copy_loop(d: &Direction<'_>, activity: &Activity, buffer_size: usize) -> io::Result<()> {
    let chunk = buffer_size
        .min(usize::try_from(d.rate).unwrap_or(usize::MAX))
        .max(1);
    let mut buf = vec![0u8; chunk];
    let start = Instant::now();
    let mut moved: u64 = 0;
    loop {
        let due = start + Duration::from_secs_f64(moved as f64 / d.rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let n = read_some(d.from, &mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        write_all(d.to, &buf[..n]).await?;
        moved += n as u64;
        d.bytes.fetch_add(n as u64, Ordering::Relaxed);
        activity.touch();
    }
}

/// One read of what is there. A short read drained the socket, so readiness
/// is cleared at once instead of by one more read that fails with EAGAIN.
pub async fn read_some(s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let len = buf.len();
    loop {
        s.readable().await?;
        let mut got = None;
        let r = s.try_io(Interest::READABLE, || {
            let n = nix::unistd::read(s.as_raw_fd(), buf)?;
            got = Some(n);
            if n > 0 && n < len {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (r, got) {
            (_, Some(n)) => return Ok(n),
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (Err(e), None) => return Err(e),
            (Ok(n), None) => return Ok(n),
        }
    }
}

pub async fn write_all(s: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        s.writable().await?;
        match s.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
