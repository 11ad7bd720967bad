//! One TCP session on the io_uring engine: access rules, limit_conn,
//! upstream selection with retries, PROXY header to the upstream, relay
//! (recv/send through a small buffer, then splice for bulk), access log.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, types};
use nix::fcntl::{splice, SpliceFFlags};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::{user_data, Env, Kind, Ring};
use crate::balancer::Peer;
use crate::config::{ListenConf, ProxyVersion};
use crate::limits::Slot;
use crate::relay::{Pipe, SmallBuf, PIPE_SIZE, SMALL_READ};
use crate::runtime::ServerCtx;
use crate::tcp::{self, STATUS_BAD_GATEWAY, STATUS_FORBIDDEN, STATUS_INTERNAL, STATUS_OK};
use crate::vars::Vars;

/// `IORING_RECVSEND_POLL_FIRST`: wait for readiness before trying.
const POLL_FIRST: u16 = 1;

/// Where one direction is.
enum State {
    /// Not started (upstream not connected yet).
    Idle,
    Receiving,
    /// Sending `buf[off..len]`.
    Sending,
    /// Bulk: socket -> pipe -> socket; `in_pipe` bytes wait in the pipe,
    /// `drained` says the last read emptied the socket.
    Splicing {
        pipe: Pipe,
        in_pipe: usize,
        drained: bool,
    },
    /// End of stream seen (half-close only).
    Done,
}

struct Dir {
    buf: SmallBuf,
    len: usize,
    off: usize,
    /// The buffer holds client data (not the PROXY header).
    counted: bool,
    bytes: u64,
    state: State,
    /// An operation of this direction is in flight.
    busy: bool,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            buf: SmallBuf::take(),
            len: 0,
            off: 0,
            counted: true,
            bytes: 0,
            state: State::Idle,
            busy: false,
        }
    }
}

/// How far a splice round got.
enum Spliced {
    /// Poll the destination (`out`) or the source, then go on.
    Wait {
        out: bool,
    },
    End,
    Failed(io::Error),
}

const UP: usize = 0;
const DOWN: usize = 1;

pub(super) struct Session {
    index: usize,
    ctx: Arc<ServerCtx>,
    vars: Vars,
    client: Option<OwnedFd>,
    upstream: Option<OwnedFd>,
    /// Target of the connect in flight (its memory must stay put).
    addr: socket2::SockAddr,
    peer: Option<Arc<Peer>>,
    tried: Vec<u64>,
    key: String,
    first_attempt: Instant,
    attempt: Instant,
    connecting: bool,
    connect_timed_out: bool,
    header_len: u64,
    dirs: [Dir; 2],
    nonblocking: bool,
    last_activity: Instant,
    ending: Option<u16>,
    inflight: u32,
    _slots: Vec<Slot>,
    _permit: Option<OwnedSemaphorePermit>,
    _token: TaskTrackerToken,
}

/// Sessions the engine does not run itself go to the tokio path.
fn wants_tokio(ctx: &ServerCtx, listen: &ListenConf) -> bool {
    let proxy = &ctx.conf.proxy;
    listen.proxy_protocol || proxy.upload_rate > 0 || proxy.download_rate > 0
}

/// Something reads the client address; otherwise getpeername is skipped.
fn needs_client_addr(ctx: &ServerCtx) -> bool {
    let proxy = &ctx.conf.proxy;
    !proxy.access.is_empty()
        || !ctx.limits.is_empty()
        || ctx.hash_key.is_some()
        || !ctx.logs.is_empty()
        || proxy.send_proxy_protocol.is_some()
}

fn unknown_addr(like: SocketAddr) -> SocketAddr {
    let ip = if like.is_ipv4() {
        IpAddr::from([0u8; 4])
    } else {
        IpAddr::from([0u16; 8])
    };
    SocketAddr::new(ip, 0)
}

fn sock_addr(fd: &OwnedFd, peer: bool) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(fd);
    let addr = if peer {
        sock.peer_addr()
    } else {
        sock.local_addr()
    };
    addr.ok().and_then(|a| a.as_socket())
}

fn hand_to_tokio(
    ctx: Arc<ServerCtx>,
    listen: ListenConf,
    fd: OwnedFd,
    permit: Option<OwnedSemaphorePermit>,
    env: &Env,
) {
    let std = std::net::TcpStream::from(fd);
    let peer = match std.set_nonblocking(true).and_then(|()| std.peer_addr()) {
        Ok(p) => p,
        Err(e) => {
            tracing::info!("accepted connection: {e}");
            return;
        }
    };
    let shared = env.shared.clone();
    env.shared.sessions.spawn_on(
        async move {
            match tokio::net::TcpStream::from_std(std) {
                Ok(client) => tcp::session(ctx, shared, listen, client, peer).await,
                Err(e) => tracing::warn!(client = %peer, "cannot register the connection: {e}"),
            }
            drop(permit);
        },
        &env.handle,
    );
}

impl Session {
    /// Takes an accepted connection; `None` when it was handed to tokio or
    /// turned away before needing an upstream.
    pub(super) fn start(
        ctx: Arc<ServerCtx>,
        listen: ListenConf,
        fd: OwnedFd,
        env: &Env,
    ) -> Option<Box<Session>> {
        let shared = &env.shared;
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        if shared.kill.is_cancelled() {
            return None;
        }
        let Ok(permit) = shared.session_slot() else {
            tracing::warn!("worker_connections are not enough, dropping a connection");
            return None;
        };
        if wants_tokio(&ctx, &listen) {
            hand_to_tokio(ctx, listen, fd, permit, env);
            return None;
        }
        let peer = if needs_client_addr(&ctx) {
            sock_addr(&fd, true).unwrap_or_else(|| unknown_addr(listen.addr))
        } else {
            unknown_addr(listen.addr)
        };
        let local = if listen.addr.ip().is_unspecified() {
            sock_addr(&fd, false).unwrap_or(listen.addr)
        } else {
            listen.addr
        };
        let mut vars = Vars::new(peer, local, false, shared.next_connection());
        let key = ctx
            .hash_key
            .as_ref()
            .map(|k| k.render(&vars))
            .unwrap_or_default();
        let mut status = None;
        let mut slots = Vec::new();
        if !tcp::allowed(&ctx, &vars) {
            shared.stats.denied.fetch_add(1, Ordering::Relaxed);
            status = Some(STATUS_FORBIDDEN);
        } else if let Some(s) = tcp::take_slots(&ctx, &vars) {
            slots = s;
        } else {
            shared.stats.limited.fetch_add(1, Ordering::Relaxed);
            status = Some(tcp::STATUS_UNAVAILABLE);
        }
        if let Some(status) = status {
            vars.status = status;
            log(&ctx, &vars);
            return None;
        }
        Some(Box::new(Session {
            index: 0,
            addr: socket2::SockAddr::from(listen.addr),
            ctx,
            vars,
            client: Some(fd),
            upstream: None,
            peer: None,
            tried: Vec::new(),
            key,
            first_attempt: env.now,
            attempt: env.now,
            connecting: false,
            connect_timed_out: false,
            header_len: 0,
            dirs: [Dir::new(), Dir::new()],
            nonblocking: false,
            last_activity: env.now,
            ending: None,
            inflight: 0,
            _slots: slots,
            _permit: permit,
            _token: shared.sessions.token(),
        }))
    }

    pub(super) fn finished(&self) -> bool {
        self.ending.is_some() && self.inflight == 0
    }

    /// Connects to the next peer that takes a socket; ends with 502 when
    /// none is left.
    pub(super) fn connect(&mut self, index: usize, ring: &mut Ring, env: &Env) {
        self.index = index;
        loop {
            let Some(peer) = self.ctx.upstream.select(self.key.as_bytes(), &self.tried) else {
                self.end(STATUS_BAD_GATEWAY, ring);
                return;
            };
            let addr = peer.conf.addr;
            self.vars.upstream_addr.push(addr);
            self.attempt = env.now;
            self.peer = Some(peer);
            match upstream_socket(addr, self.ctx.conf.proxy.bind) {
                Ok(fd) => {
                    self.addr = socket2::SockAddr::from(addr);
                    let entry = opcode::Connect::new(
                        types::Fd(fd.as_raw_fd()),
                        self.addr.as_ptr(),
                        self.addr.len(),
                    )
                    .build()
                    .user_data(user_data(Kind::Connect, self.index));
                    self.upstream = Some(fd);
                    self.connecting = true;
                    self.connect_timed_out = false;
                    self.inflight += 1;
                    // SAFETY: self.addr lives in this boxed session, which
                    // stays until its last completion.
                    unsafe { ring.push(&entry) };
                    return;
                }
                Err(e) => {
                    if !self.connect_failed(e, env) {
                        self.end(STATUS_BAD_GATEWAY, ring);
                        return;
                    }
                }
            }
        }
    }

    /// Counts a failed attempt; true when proxy_next_upstream allows another.
    fn connect_failed(&mut self, e: io::Error, env: &Env) -> bool {
        let proxy = &self.ctx.conf.proxy;
        if let Some(peer) = self.peer.take() {
            tracing::warn!(upstream = %self.ctx.upstream.name, peer = %peer.conf.addr,
                client = %self.client_for_log(), "connect failed: {e}");
            self.ctx.upstream.release(&peer, true);
            self.tried.push(peer.id);
        }
        self.upstream = None;
        let out_of_tries =
            proxy.next_upstream_tries > 0 && self.tried.len() >= proxy.next_upstream_tries as usize;
        let out_of_time = !proxy.next_upstream_timeout.is_zero()
            && env.now.duration_since(self.first_attempt) >= proxy.next_upstream_timeout;
        proxy.next_upstream && !out_of_tries && !out_of_time
    }

    fn client_for_log(&self) -> SocketAddr {
        match &self.client {
            Some(fd) if self.vars.remote.port() == 0 => {
                sock_addr(fd, true).unwrap_or(self.vars.remote)
            }
            _ => self.vars.remote,
        }
    }

    pub(super) fn complete(&mut self, kind: Kind, res: i32, ring: &mut Ring, env: &Env) {
        self.inflight -= 1;
        match kind {
            Kind::Connect => {
                self.connecting = false;
                if self.ending.is_none() {
                    self.connected(res, ring, env);
                }
            }
            Kind::Up | Kind::Down => {
                let d = if kind == Kind::Up { UP } else { DOWN };
                self.dirs[d].busy = false;
                if self.ending.is_none() {
                    self.step(d, res, ring, env);
                }
            }
            _ => {}
        }
    }

    fn connected(&mut self, res: i32, ring: &mut Ring, env: &Env) {
        if res < 0 {
            let e = if self.connect_timed_out {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", self.ctx.conf.proxy.connect_timeout),
                )
            } else {
                io::Error::from_raw_os_error(-res)
            };
            if self.connect_failed(e, env) {
                self.connect(self.index, ring, env);
            } else {
                self.end(STATUS_BAD_GATEWAY, ring);
            }
            return;
        }
        self.vars.upstream_connect_time = Some(env.now.duration_since(self.attempt));
        self.last_activity = env.now;
        let header = match self.ctx.conf.proxy.send_proxy_protocol {
            Some(ProxyVersion::V1) => {
                crate::proxy_protocol::encode_v1(self.vars.remote, self.vars.server)
            }
            Some(ProxyVersion::V2) => {
                crate::proxy_protocol::encode_v2(self.vars.remote, self.vars.server, false)
            }
            None => Vec::new(),
        };
        if header.is_empty() {
            self.recv(UP, false, ring);
        } else {
            let up = &mut self.dirs[UP];
            up.buf.0[..header.len()].copy_from_slice(&header);
            (up.len, up.off, up.counted) = (header.len(), 0, false);
            self.header_len = header.len() as u64;
            self.send(UP, ring);
        }
        self.recv(DOWN, true, ring);
    }

    fn fds(&self, d: usize) -> (&OwnedFd, &OwnedFd) {
        let (Some(client), Some(upstream)) = (&self.client, &self.upstream) else {
            unreachable!("a relaying session has both sockets")
        };
        if d == UP {
            (client, upstream)
        } else {
            (upstream, client)
        }
    }

    fn kind(d: usize) -> Kind {
        if d == UP {
            Kind::Up
        } else {
            Kind::Down
        }
    }

    fn submit(&mut self, d: usize, entry: io_uring::squeue::Entry, ring: &mut Ring) {
        let entry = entry.user_data(user_data(Self::kind(d), self.index));
        self.dirs[d].busy = true;
        self.inflight += 1;
        // SAFETY: the entry points into this boxed session's buffers, which
        // stay until its last completion.
        unsafe { ring.push(&entry) };
    }

    fn recv(&mut self, d: usize, poll_first: bool, ring: &mut Ring) {
        let from = self.fds(d).0.as_raw_fd();
        let dir = &mut self.dirs[d];
        dir.state = State::Receiving;
        let entry = opcode::Recv::new(types::Fd(from), dir.buf.0.as_mut_ptr(), SMALL_READ as u32)
            .ioprio(if poll_first { POLL_FIRST } else { 0 })
            .build();
        self.submit(d, entry, ring);
    }

    fn send(&mut self, d: usize, ring: &mut Ring) {
        let to = self.fds(d).1.as_raw_fd();
        let dir = &mut self.dirs[d];
        dir.state = State::Sending;
        let rest = &dir.buf.0[dir.off..dir.len];
        let entry = opcode::Send::new(types::Fd(to), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        self.submit(d, entry, ring);
    }

    fn poll(&mut self, d: usize, out: bool, ring: &mut Ring) {
        let (from, to) = self.fds(d);
        let (fd, mask) = if out {
            (to.as_raw_fd(), libc::POLLOUT)
        } else {
            (from.as_raw_fd(), libc::POLLIN)
        };
        let entry = opcode::PollAdd::new(types::Fd(fd), mask as u32).build();
        self.submit(d, entry, ring);
    }

    /// The next move of direction `d` after its operation returned `res`.
    fn step(&mut self, d: usize, res: i32, ring: &mut Ring, env: &Env) {
        if res == -libc::EAGAIN || res == -libc::EINTR {
            // Not ready after all: wait for readiness and try again.
            match self.dirs[d].state {
                State::Receiving => self.recv(d, true, ring),
                State::Sending => self.send(d, ring),
                _ => self.splice_step(d, ring, env),
            }
            return;
        }
        if res < 0 {
            self.io_error(d, io::Error::from_raw_os_error(-res), ring);
            return;
        }
        let n = res as usize;
        match self.dirs[d].state {
            State::Receiving if n == 0 => self.end_of_stream(d, ring),
            State::Receiving => {
                self.last_activity = env.now;
                let dir = &mut self.dirs[d];
                (dir.len, dir.off, dir.counted) = (n, 0, true);
                self.send(d, ring);
            }
            State::Sending => {
                let dir = &mut self.dirs[d];
                dir.off += n;
                if dir.off < dir.len {
                    self.send(d, ring);
                    return;
                }
                if !dir.counted {
                    self.recv(d, false, ring);
                    return;
                }
                dir.bytes += dir.len as u64;
                if dir.len == SMALL_READ {
                    self.start_splice(d, ring, env);
                } else {
                    self.recv(d, false, ring);
                }
            }
            State::Splicing { .. } => self.splice_step(d, ring, env),
            State::Idle | State::Done => {}
        }
    }

    fn io_error(&mut self, d: usize, e: io::Error, ring: &mut Ring) {
        let side = if d == UP {
            "client to upstream"
        } else {
            "upstream to client"
        };
        tracing::info!(client = %self.client_for_log(), "session ended: {side}: {e}");
        self.end(STATUS_INTERNAL, ring);
    }

    fn end_of_stream(&mut self, d: usize, ring: &mut Ring) {
        if !self.ctx.conf.proxy.half_close {
            self.end(STATUS_OK, ring);
            return;
        }
        self.finish_dir(d);
        // The other way may still carry data: only close our write side.
        let to = self.fds(d).1.as_raw_fd();
        ring.push_ignored(opcode::Shutdown::new(types::Fd(to), libc::SHUT_WR).build());
        if matches!(self.dirs[1 - d].state, State::Done) {
            self.end(STATUS_OK, ring);
        }
    }

    /// Marks a direction done, returning its pipe to the pool if empty.
    fn finish_dir(&mut self, d: usize) {
        if let State::Splicing {
            pipe, in_pipe: 0, ..
        } = std::mem::replace(&mut self.dirs[d].state, State::Done)
        {
            pipe.give_back();
        }
    }

    /// Bulk data: the rest of this direction goes through splice(2). Both
    /// sockets become nonblocking for the splice syscalls (io_uring
    /// operations of the other direction still wait by polling).
    fn start_splice(&mut self, d: usize, ring: &mut Ring, env: &Env) {
        let pipe = match Pipe::take() {
            Ok(p) => p,
            Err(e) => return self.io_error(d, e, ring),
        };
        if !self.nonblocking {
            let (a, b) = self.fds(d);
            let set = |fd: &OwnedFd| socket2::SockRef::from(fd).set_nonblocking(true);
            if let Err(e) = set(a).and_then(|()| set(b)) {
                return self.io_error(d, e, ring);
            }
            self.nonblocking = true;
        }
        self.dirs[d].state = State::Splicing {
            pipe,
            in_pipe: 0,
            drained: false,
        };
        self.splice_step(d, ring, env);
    }

    /// Moves what it can without blocking, then polls the socket it waits on.
    fn splice_step(&mut self, d: usize, ring: &mut Ring, env: &Env) {
        match self.splice_some(d, env) {
            Spliced::Wait { out } => self.poll(d, out, ring),
            Spliced::End => self.end_of_stream(d, ring),
            Spliced::Failed(e) => self.io_error(d, e, ring),
        }
    }

    fn splice_some(&mut self, d: usize, env: &Env) -> Spliced {
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
        let (Some(client), Some(upstream)) = (&self.client, &self.upstream) else {
            return Spliced::End;
        };
        let (from, to) = if d == UP {
            (client.as_fd(), upstream.as_fd())
        } else {
            (upstream.as_fd(), client.as_fd())
        };
        let dir = &mut self.dirs[d];
        let State::Splicing {
            pipe,
            in_pipe,
            drained,
        } = &mut dir.state
        else {
            return Spliced::End;
        };
        loop {
            if *in_pipe > 0 {
                match splice(pipe.0.as_fd(), None, to, None, *in_pipe, flags) {
                    Ok(m) => {
                        *in_pipe -= m;
                        dir.bytes += m as u64;
                        self.last_activity = env.now;
                        continue;
                    }
                    Err(nix::errno::Errno::EAGAIN) => return Spliced::Wait { out: true },
                    Err(e) => return Spliced::Failed(e.into()),
                }
            }
            if *drained {
                *drained = false;
                return Spliced::Wait { out: false };
            }
            match splice(from, None, pipe.1.as_fd(), None, PIPE_SIZE, flags) {
                Ok(0) => return Spliced::End,
                Ok(n) => {
                    *in_pipe = n;
                    *drained = n < PIPE_SIZE;
                }
                Err(nix::errno::Errno::EAGAIN) => return Spliced::Wait { out: false },
                Err(e) => return Spliced::Failed(e.into()),
            }
        }
    }

    /// Ends the session with `status` (the first call decides): operations
    /// in flight are cancelled; the sockets close once all have completed.
    pub(super) fn end(&mut self, status: u16, ring: &mut Ring) {
        if self.ending.is_some() {
            return;
        }
        self.ending = Some(status);
        if self.connecting {
            ring.cancel(user_data(Kind::Connect, self.index));
        }
        for d in [UP, DOWN] {
            if self.dirs[d].busy {
                ring.cancel(user_data(Self::kind(d), self.index));
            }
        }
    }

    /// Idle (`proxy_timeout`) and connect (`proxy_connect_timeout`) deadlines.
    pub(super) fn check_deadlines(&mut self, ring: &mut Ring, env: &Env) {
        if self.ending.is_some() {
            return;
        }
        let proxy = &self.ctx.conf.proxy;
        if self.connecting {
            if !self.connect_timed_out
                && env.now.duration_since(self.attempt) >= proxy.connect_timeout
            {
                self.connect_timed_out = true;
                ring.cancel(user_data(Kind::Connect, self.index));
            }
        } else if env.now.duration_since(self.last_activity) >= proxy.timeout {
            tracing::info!(client = %self.client_for_log(), "session ended: idle for {:?} (proxy_timeout)", proxy.timeout);
            self.end(STATUS_OK, ring);
        }
    }

    /// Closes both sockets and accounts for the session (counters, the
    /// upstream's connection count, access log).
    pub(super) fn close(mut self: Box<Self>, ring: &mut Ring) {
        for fd in [self.client.take(), self.upstream.take()]
            .into_iter()
            .flatten()
        {
            ring.close(fd);
        }
        for d in [UP, DOWN] {
            self.finish_dir(d);
        }
        let vars = &mut self.vars;
        vars.status = self.ending.unwrap_or(STATUS_OK);
        vars.bytes_received = self.dirs[UP].bytes;
        vars.bytes_sent = self.dirs[DOWN].bytes;
        vars.upstream_bytes_sent = vars.bytes_received + self.header_len;
        vars.upstream_bytes_received = vars.bytes_sent;
        if let Some(peer) = self.peer.take() {
            peer.bytes_sent
                .fetch_add(vars.upstream_bytes_sent, Ordering::Relaxed);
            peer.bytes_received
                .fetch_add(vars.upstream_bytes_received, Ordering::Relaxed);
            self.ctx.upstream.release(&peer, false);
        }
        log(&self.ctx, &self.vars);
    }
}

fn log(ctx: &ServerCtx, vars: &Vars) {
    for (log, format) in &ctx.logs {
        log.write_line(&format.render(vars));
    }
}

/// A blocking socket for the upstream (io_uring does not block on it), with
/// TCP_NODELAY set before connecting and `proxy_bind` applied.
fn upstream_socket(addr: SocketAddr, bind: Option<IpAddr>) -> io::Result<OwnedFd> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_nodelay(true)?;
    if let Some(ip) = bind {
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    Ok(socket.into())
}
