//! The io_uring engine for TCP: accepting, connecting, relaying and closing
//! sessions with batched submissions instead of one syscall each and epoll
//! registrations per socket (see docs/lb.md, "Data path").
//!
//! One thread per worker owns a ring, the listeners (multishot accept) and
//! its sessions, each a small state machine ([`session`]). Sessions that need
//! the tokio path (PROXY protocol on the listen socket, rate limits) are
//! handed to the tokio runtime right after accept. The runtime talks to the
//! threads through an inbox and an eventfd.

mod session;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;
use tokio::sync::watch;

use crate::runtime::{ListenValue, Shared};
use session::Session;

/// Submission queue entries; the completion queue gets four times as many.
const ENTRIES: u32 = 1024;
/// How often idle (`proxy_timeout`) and connect deadlines are checked.
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error("io_uring is not available: {0}")]
    Unavailable(io::Error),
    #[error("the kernel's io_uring lacks {0}")]
    Missing(&'static str),
    #[error("cannot start an io_uring thread: {0}")]
    Thread(io::Error),
}

/// What a completion belongs to: the low byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    Accept = 1,
    Connect = 2,
    /// An operation of the client-to-upstream direction.
    Up = 3,
    /// An operation of the upstream-to-client direction.
    Down = 4,
    Tick = 5,
    Wake = 6,
    /// Cancel, close, shutdown: nothing waits for them.
    Ignore = 7,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Accept,
            2 => Kind::Connect,
            3 => Kind::Up,
            4 => Kind::Down,
            5 => Kind::Tick,
            6 => Kind::Wake,
            7 => Kind::Ignore,
            _ => return None,
        })
    }
}

fn user_data(kind: Kind, index: usize) -> u64 {
    ((index as u64) << 8) | kind as u64
}

/// The ring, with pushes that never fail (a full queue is submitted first).
struct Ring(IoUring);

impl Ring {
    /// # Safety
    /// Every buffer and address the entry points to must stay valid until
    /// its completion arrives (they live in boxed sessions and listeners).
    unsafe fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: the caller keeps the entry's memory alive (see above).
            if unsafe { self.0.submission().push(entry) }.is_ok() {
                return;
            }
            if let Err(e) = self.0.submit() {
                tracing::warn!("io_uring submit: {e}");
            }
        }
    }

    /// An operation nobody waits for (its failures are logged at debug level).
    fn push_ignored(&mut self, entry: squeue::Entry) {
        let entry = entry
            .user_data(user_data(Kind::Ignore, 0))
            .flags(squeue::Flags::SKIP_SUCCESS);
        // SAFETY: cancel, close and shutdown entries point to no memory.
        unsafe { self.push(&entry) };
    }

    fn close(&mut self, fd: OwnedFd) {
        use std::os::fd::IntoRawFd;
        self.push_ignored(opcode::Close::new(types::Fd(fd.into_raw_fd())).build());
    }

    fn cancel(&mut self, user_data: u64) {
        self.push_ignored(opcode::AsyncCancel::new(user_data).build());
    }
}

enum Command {
    Listen(OwnedFd, watch::Receiver<ListenValue>),
    /// Listeners were changed or removed: look at their `serve` values.
    Refresh,
    /// A fast stop: end every session now.
    Kill,
    /// Kill, close the listeners and end the thread.
    Stop,
}

struct Inbox {
    commands: Mutex<Vec<Command>>,
    event: OwnedFd,
}

impl Inbox {
    fn send(&self, command: Command) {
        self.commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(command);
        let one = 1u64.to_ne_bytes();
        // An eventfd write only fails when the counter would overflow, and
        // then the thread has a wake-up pending anyway.
        let _ = nix::unistd::write(&self.event, &one);
    }
}

/// The io_uring threads of one balancer.
pub struct Engine {
    workers: Vec<(Arc<Inbox>, Option<JoinHandle<()>>)>,
}

impl Engine {
    /// Starts `threads` io_uring threads; an error means the caller should
    /// use the epoll path. `handle` runs the sessions handed to tokio.
    pub fn start(
        threads: usize,
        shared: Arc<Shared>,
        handle: tokio::runtime::Handle,
    ) -> Result<Engine, UringError> {
        let mut engine = Engine {
            workers: Vec::new(),
        };
        for n in 0..threads.max(1) {
            let event =
                nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC)
                    .map_err(|e| UringError::Unavailable(e.into()))?;
            let inbox = Arc::new(Inbox {
                commands: Mutex::new(Vec::new()),
                event: OwnedFd::from(event),
            });
            let (ready_tx, ready_rx) = mpsc::channel();
            let (thread_inbox, shared, handle) = (inbox.clone(), shared.clone(), handle.clone());
            // The ring is made on its thread: with SINGLE_ISSUER only that
            // thread may submit.
            let thread = std::thread::Builder::new()
                .name(format!("lb-uring-{n}"))
                .spawn(move || match Worker::new(thread_inbox, shared, handle) {
                    Ok(worker) => {
                        let _ = ready_tx.send(Ok(()));
                        worker.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                })
                .map_err(UringError::Thread)?;
            let ready = ready_rx
                .recv()
                .unwrap_or(Err(UringError::Missing("a working thread")));
            engine.workers.push((inbox, Some(thread)));
            ready?;
        }
        Ok(engine)
    }

    /// Serves a bound listening socket on every thread until its `serve`
    /// value becomes `None` (or its sender goes away) and `refresh` is called.
    pub fn listen(
        &self,
        listener: &std::net::TcpListener,
        serve: &watch::Receiver<ListenValue>,
    ) -> io::Result<()> {
        for (inbox, _) in &self.workers {
            let fd = listener.try_clone()?;
            inbox.send(Command::Listen(OwnedFd::from(fd), serve.clone()));
        }
        Ok(())
    }

    pub fn refresh(&self) {
        self.broadcast(|| Command::Refresh);
    }

    pub fn kill(&self) {
        self.broadcast(|| Command::Kill);
    }

    fn broadcast(&self, command: impl Fn() -> Command) {
        for (inbox, _) in &self.workers {
            inbox.send(command());
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.broadcast(|| Command::Stop);
        for (_, thread) in &mut self.workers {
            if let Some(t) = thread.take() {
                let _ = t.join();
            }
        }
    }
}

struct Listener {
    fd: OwnedFd,
    serve: watch::Receiver<ListenValue>,
    /// A multishot accept is in flight.
    armed: bool,
    /// Cancelled; closed once its accept has ended.
    closing: bool,
}

/// What sessions need from their thread besides the ring.
struct Env {
    shared: Arc<Shared>,
    handle: tokio::runtime::Handle,
    /// The time of the completions being handled (one clock read per batch).
    now: Instant,
}

struct Worker {
    ring: Ring,
    inbox: Arc<Inbox>,
    env: Env,
    listeners: Slab<Listener>,
    sessions: Slab<Box<Session>>,
    wake_buf: Box<[u8; 8]>,
    tick: Box<types::Timespec>,
    stopping: bool,
}

/// Builds a ring with the cheapest task-running mode the kernel offers.
fn new_ring() -> Result<IoUring, UringError> {
    let deferred = IoUring::builder()
        .setup_cqsize(ENTRIES * 4)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(ENTRIES);
    let ring = match deferred {
        Ok(r) => r,
        Err(_) => IoUring::builder()
            .setup_cqsize(ENTRIES * 4)
            .build(ENTRIES)
            .map_err(UringError::Unavailable)?,
    };
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(UringError::Unavailable)?;
    let needed = [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::Connect::CODE, "connect"),
        (opcode::Recv::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::Close::CODE, "close"),
        (opcode::AsyncCancel::CODE, "cancel"),
        (opcode::Timeout::CODE, "timeout"),
        (opcode::PollAdd::CODE, "poll"),
        (opcode::Shutdown::CODE, "shutdown"),
        (opcode::Read::CODE, "read"),
        // Added with multishot accept (Linux 5.19).
        (opcode::Socket::CODE, "multishot accept (Linux 5.19)"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(UringError::Missing(name));
        }
    }
    if !ring.params().is_feature_skip_cqe_on_success() {
        return Err(UringError::Missing("IOSQE_CQE_SKIP_SUCCESS"));
    }
    Ok(ring)
}

impl Worker {
    fn new(
        inbox: Arc<Inbox>,
        shared: Arc<Shared>,
        handle: tokio::runtime::Handle,
    ) -> Result<Worker, UringError> {
        Ok(Worker {
            ring: Ring(new_ring()?),
            inbox,
            env: Env {
                shared,
                handle,
                now: Instant::now(),
            },
            listeners: Slab::new(),
            sessions: Slab::new(),
            wake_buf: Box::new([0; 8]),
            tick: Box::new(
                types::Timespec::new()
                    .sec(TICK.as_secs())
                    .nsec(TICK.subsec_nanos()),
            ),
            stopping: false,
        })
    }

    fn run(mut self) {
        self.arm_wake();
        self.arm_tick();
        let mut batch = Vec::with_capacity(256);
        loop {
            match self.ring.0.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => {
                    tracing::error!("io_uring wait failed, the thread stops: {e}");
                    return;
                }
            }
            self.env.now = Instant::now();
            batch.extend(
                self.ring
                    .0
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for (data, res, flags) in batch.drain(..) {
                self.dispatch(data, res, flags);
            }
            if self.stopping && self.sessions.is_empty() && self.listeners.is_empty() {
                // Closes and cancels still queued go in before the ring goes.
                let _ = self.ring.0.submit();
                return;
            }
        }
    }

    fn dispatch(&mut self, data: u64, res: i32, flags: u32) {
        let index = (data >> 8) as usize;
        match Kind::from_u8(data as u8) {
            Some(Kind::Accept) => self.accepted(index, res, flags),
            Some(kind @ (Kind::Connect | Kind::Up | Kind::Down)) => {
                let Some(session) = self.sessions.get_mut(index) else {
                    tracing::error!("io_uring completion for a session that is gone");
                    return;
                };
                session.complete(kind, res, &mut self.ring, &self.env);
                if session.finished() {
                    self.finish(index);
                }
            }
            Some(Kind::Tick) => self.ticked(),
            Some(Kind::Wake) => self.woken(),
            Some(Kind::Ignore) if res < 0 && res != -libc::ENOENT && res != -libc::EALREADY => {
                tracing::debug!(
                    "io_uring cancel/close/shutdown: {}",
                    io::Error::from_raw_os_error(-res)
                );
            }
            Some(Kind::Ignore) | None => {}
        }
    }

    fn finish(&mut self, index: usize) {
        let session = self.sessions.remove(index);
        session.close(&mut self.ring);
    }

    fn arm_wake(&mut self) {
        let entry = opcode::Read::new(
            types::Fd(self.inbox.event.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(user_data(Kind::Wake, 0));
        // SAFETY: wake_buf is boxed and lives as long as the worker.
        unsafe { self.ring.push(&entry) };
    }

    fn arm_tick(&mut self) {
        let entry = opcode::Timeout::new(&*self.tick)
            .build()
            .user_data(user_data(Kind::Tick, 0));
        // SAFETY: the timespec is boxed and lives as long as the worker.
        unsafe { self.ring.push(&entry) };
    }

    fn arm_accept(&mut self, index: usize) {
        let listener = &mut self.listeners[index];
        let entry = opcode::AcceptMulti::new(types::Fd(listener.fd.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(Kind::Accept, index));
        listener.armed = true;
        // SAFETY: a multishot accept without an address points to no memory.
        unsafe { self.ring.push(&entry) };
    }

    fn woken(&mut self) {
        let commands = std::mem::take(
            &mut *self
                .inbox
                .commands
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for command in commands {
            match command {
                Command::Listen(fd, serve) => {
                    let index = self.listeners.insert(Listener {
                        fd,
                        serve,
                        armed: false,
                        closing: false,
                    });
                    self.arm_accept(index);
                }
                Command::Refresh => self.refresh_listeners(),
                Command::Kill => self.kill_sessions(),
                Command::Stop => {
                    self.stopping = true;
                    self.kill_sessions();
                    self.refresh_listeners();
                }
            }
        }
        if !self.stopping {
            self.arm_wake();
        }
    }

    /// Cancels the accepts of listeners that serve nothing any more; each
    /// socket closes once its accept has ended (closing it earlier would
    /// leave it listening inside the pending accept).
    fn refresh_listeners(&mut self) {
        let mut gone = Vec::new();
        for (index, l) in &mut self.listeners {
            let retired =
                self.stopping || l.serve.has_changed().is_err() || l.serve.borrow().is_none();
            if retired && !l.closing {
                l.closing = true;
                if l.armed {
                    self.ring.cancel(user_data(Kind::Accept, index));
                } else {
                    gone.push(index);
                }
            }
        }
        for index in gone {
            let l = self.listeners.remove(index);
            self.ring.close(l.fd);
        }
    }

    fn kill_sessions(&mut self) {
        let mut done = Vec::new();
        for (index, session) in &mut self.sessions {
            session.end(crate::tcp::STATUS_OK, &mut self.ring);
            if session.finished() {
                done.push(index);
            }
        }
        for index in done {
            self.finish(index);
        }
    }

    fn ticked(&mut self) {
        let mut done = Vec::new();
        for (index, session) in &mut self.sessions {
            session.check_deadlines(&mut self.ring, &self.env);
            if session.finished() {
                done.push(index);
            }
        }
        for index in done {
            self.finish(index);
        }
        // Accepts that stopped (EMFILE and the like) get another go.
        let idle: Vec<usize> = self
            .listeners
            .iter()
            .filter(|(_, l)| !l.armed && !l.closing)
            .map(|(i, _)| i)
            .collect();
        for index in idle {
            self.arm_accept(index);
        }
        if !self.stopping {
            self.arm_tick();
        }
    }

    fn accepted(&mut self, index: usize, res: i32, flags: u32) {
        let Some(listener) = self.listeners.get_mut(index) else {
            return;
        };
        if !cqueue::more(flags) {
            listener.armed = false;
            if listener.closing {
                let l = self.listeners.remove(index);
                self.ring.close(l.fd);
            } else if res >= 0 || res == -libc::ECANCELED || res == -libc::EAGAIN {
                self.arm_accept(index);
            }
            // Other errors (EMFILE, ENOBUFS): the next tick re-arms.
        }
        if res < 0 {
            if res != -libc::ECANCELED {
                tracing::warn!("accept: {}", io::Error::from_raw_os_error(-res));
            }
            return;
        }
        // SAFETY: a successful accept returns a new descriptor we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(res as RawFd) };
        let Some(listener) = self.listeners.get(index) else {
            return;
        };
        let serving = listener.serve.borrow().clone();
        let Some((ctx, listen)) = serving else {
            return;
        };
        if let Some(session) = Session::start(ctx, listen, fd, &self.env) {
            let entry = self.sessions.vacant_entry();
            let index = entry.key();
            let session = entry.insert(session);
            session.connect(index, &mut self.ring, &self.env);
            if session.finished() {
                self.finish(index);
            }
        }
    }
}
