//! Upstream peer selection, as nginx does it: smooth weighted round robin,
//! least_conn, hash (Cache::Memcached compatible) and consistent hash (ketama),
//! random and random two; passive health (max_fails/fail_timeout), backup,
//! down, max_conns, plus runtime state (health checks, drain, API weight) and
//! servers added or removed at run time.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Method, PeerConf, UpstreamConf};

/// nginx gives up rehashing after this many tries and falls back to round robin.
const HASH_TRIES: u32 = 20;
/// Ketama points per unit of weight (nginx's value).
const POINTS_PER_WEIGHT: u32 = 160;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpstreamError {
    #[error("upstream \"{upstream}\" has no server with id {id}")]
    NoSuchServer { upstream: String, id: u64 },
    #[error("upstream \"{0}\": \"backup\" works only with round robin and least_conn")]
    BackupNeedsRoundRobin(String),
    #[error("upstream \"{0}\": weight must be at least 1")]
    ZeroWeight(String),
    #[error("upstream \"{upstream}\": the change is made but cannot be saved to its state file {path}: {reason}")]
    State {
        upstream: String,
        path: PathBuf,
        reason: String,
    },
}

/// One upstream server and its live counters. Sessions hold it by `Arc`; a
/// reload that keeps the `server` line unchanged hands the same peer to the
/// new configuration, so health, counters and active sessions carry over.
#[derive(Debug)]
pub struct Peer {
    /// Stable within its upstream (also across reloads): the API's server id.
    pub id: u64,
    pub conf: PeerConf,
    pub weight: AtomicU32,
    pub active: AtomicU32,
    pub admin_down: AtomicBool,
    pub draining: AtomicBool,
    /// Result of active health checks (true until a check says otherwise).
    pub healthy: AtomicBool,
    /// Consecutive failed and passed health checks.
    pub check_fails: AtomicU32,
    pub check_passes: AtomicU32,
    pub connections: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub failures: AtomicU64,
}

/// Passive-health and round-robin state of one peer.
#[derive(Debug, Clone, Default)]
struct PeerState {
    current_weight: i64,
    effective_weight: i64,
    fails: u32,
    checked: Option<Instant>,
}

/// The current servers of an upstream, guarded by one lock.
#[derive(Debug, Default)]
struct Peers {
    list: Vec<Arc<Peer>>,
    /// Parallel to `list`.
    state: Vec<PeerState>,
    /// (hash, index into `list`), sorted, for `hash ... consistent`.
    points: Vec<(u32, usize)>,
    next_id: u64,
}

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    method: Method,
    peers: Mutex<Peers>,
    /// The `state` file, and a lock that keeps its writes in order.
    state: Option<(PathBuf, Mutex<()>)>,
}

/// Why a peer is not eligible right now; also what the API reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerStatus {
    Up,
    Down,
    Draining,
    Unhealthy,
    Unavail,
}

impl Upstream {
    /// Builds the upstream of `conf`. Peers of `previous` (the same upstream in
    /// the configuration a reload replaces) whose `server` line is unchanged
    /// are kept, with their id, counters, health and passive-failure state.
    pub fn new(conf: &UpstreamConf, previous: Option<&Upstream>) -> Upstream {
        let old = previous.map(|p| p.lock());
        let mut peers = Peers {
            next_id: old.as_ref().map_or(0, |o| o.next_id),
            ..Peers::default()
        };
        let mut taken = vec![false; old.as_ref().map_or(0, |o| o.list.len())];
        for pc in &conf.servers {
            let kept = old.as_ref().and_then(|o| {
                // The file line or, from a state file, what the API made of it.
                let i = (0..o.list.len()).find(|&i| {
                    !taken[i] && (o.list[i].conf == *pc || o.list[i].current_conf() == *pc)
                })?;
                taken[i] = true;
                Some((o.list[i].clone(), o.state[i].clone()))
            });
            let (peer, st) = kept.unwrap_or_else(|| {
                peers.next_id += 1;
                (
                    Arc::new(Peer::new(peers.next_id - 1, pc)),
                    PeerState::default(),
                )
            });
            peers.state.push(PeerState {
                current_weight: 0,
                effective_weight: i64::from(peer.weight.load(Ordering::Relaxed)),
                ..st
            });
            peers.list.push(peer);
        }
        drop(old);
        let upstream = Upstream {
            name: conf.name.clone(),
            method: conf.method.clone(),
            peers: Mutex::new(peers),
            state: conf.state.clone().map(|p| (p, Mutex::new(()))),
        };
        upstream.rebuild_points(&mut upstream.lock());
        upstream
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    /// Writes the current servers to the `state` file, if the upstream has
    /// one (through a temporary file and a rename: never half written).
    pub fn save_state(&self) -> Result<(), UpstreamError> {
        let Some((path, order)) = &self.state else {
            return Ok(());
        };
        let _order = order.lock().unwrap_or_else(|e| e.into_inner());
        let text: String = self
            .peers()
            .iter()
            .map(|p| state_line(&p.current_conf()))
            .collect();
        write_atomically(path, text.as_bytes()).map_err(|e| UpstreamError::State {
            upstream: self.name.clone(),
            path: path.clone(),
            reason: e.to_string(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Peers> {
        // A panic while holding this lock cannot leave the counters inconsistent
        // in a way that matters more than refusing all traffic would.
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rebuild_points(&self, peers: &mut Peers) {
        if let Method::Hash {
            consistent: true, ..
        } = self.method
        {
            peers.points = ketama_points(&peers.list);
        }
    }

    /// The current servers, in configuration order (API additions last).
    pub fn peers(&self) -> Vec<Arc<Peer>> {
        self.lock().list.clone()
    }

    pub fn find(&self, id: u64) -> Result<Arc<Peer>, UpstreamError> {
        self.lock()
            .list
            .iter()
            .find(|p| p.id == id)
            .cloned()
            .ok_or_else(|| self.no_such(id))
    }

    fn no_such(&self, id: u64) -> UpstreamError {
        UpstreamError::NoSuchServer {
            upstream: self.name.clone(),
            id,
        }
    }

    /// Adds a server at run time (the API's POST), already down or draining
    /// if asked, so no session reaches it before that holds; it gets the next
    /// free id.
    pub fn add(&self, conf: PeerConf, down: bool, drain: bool) -> Result<Arc<Peer>, UpstreamError> {
        if conf.weight == 0 {
            return Err(UpstreamError::ZeroWeight(self.name.clone()));
        }
        if conf.backup && !matches!(self.method, Method::RoundRobin | Method::LeastConn) {
            return Err(UpstreamError::BackupNeedsRoundRobin(self.name.clone()));
        }
        let mut peers = self.lock();
        let peer = Peer::new(peers.next_id, &conf);
        peer.admin_down.store(down, Ordering::Relaxed);
        peer.draining.store(drain, Ordering::Relaxed);
        let peer = Arc::new(peer);
        peers.next_id += 1;
        peers.state.push(PeerState {
            effective_weight: i64::from(conf.weight),
            ..PeerState::default()
        });
        peers.list.push(peer.clone());
        self.rebuild_points(&mut peers);
        Ok(peer)
    }

    /// Removes a server at run time (the API's DELETE); its open sessions
    /// finish, no new ones go to it.
    pub fn remove(&self, id: u64) -> Result<Arc<Peer>, UpstreamError> {
        let mut peers = self.lock();
        let i = peers
            .list
            .iter()
            .position(|p| p.id == id)
            .ok_or_else(|| self.no_such(id))?;
        let peer = peers.list.remove(i);
        peers.state.remove(i);
        self.rebuild_points(&mut peers);
        Ok(peer)
    }

    /// Picks a peer whose id is not in `tried` for a session with hash key
    /// `key`, and counts a connection on it. `None` when no peer is available.
    pub fn select(&self, key: &[u8], tried: &[u64]) -> Option<Arc<Peer>> {
        let mut peers = self.lock();
        let peers = &mut *peers;
        let now = Instant::now();
        let choice = match &self.method {
            Method::RoundRobin => peers.round_robin(now, tried, false),
            Method::LeastConn => peers.least_conn(now, tried, false),
            Method::Hash {
                consistent: false, ..
            } => peers.hash(now, key, tried),
            Method::Hash {
                consistent: true, ..
            } => peers.consistent(now, key, tried),
            Method::Random { two, .. } => peers.random(now, tried, *two),
        };
        // Hash and random fall back to round robin, as nginx does after 20 tries;
        // backups serve only when no primary can.
        let choice = choice
            .or_else(|| match self.method {
                Method::Hash { .. } | Method::Random { .. } => peers.round_robin(now, tried, false),
                _ => None,
            })
            .or_else(|| match self.method {
                Method::LeastConn => peers.least_conn(now, tried, true),
                _ => peers.round_robin(now, tried, true),
            })?;
        let peer = peers.list[choice].clone();
        if peer.conf.max_fails > 0 {
            let st = &mut peers.state[choice];
            if st
                .checked
                .is_some_and(|c| now.duration_since(c) > peer.conf.fail_timeout)
            {
                st.checked = Some(now);
            }
        }
        peer.active.fetch_add(1, Ordering::Relaxed);
        peer.connections.fetch_add(1, Ordering::Relaxed);
        Some(peer)
    }

    /// Ends a connection attempt or session on `peer`; `failed` counts towards max_fails.
    pub fn release(&self, peer: &Peer, failed: bool) {
        peer.active.fetch_sub(1, Ordering::Relaxed);
        if failed {
            peer.failures.fetch_add(1, Ordering::Relaxed);
        }
        let mut peers = self.lock();
        // A peer removed through the API has no state left to update.
        let Some(i) = peers.list.iter().position(|p| std::ptr::eq(&**p, peer)) else {
            return;
        };
        let st = &mut peers.state[i];
        if !failed {
            st.fails = 0;
            return;
        }
        st.fails += 1;
        st.checked = Some(Instant::now());
        if let Some(step) = peer
            .weight
            .load(Ordering::Relaxed)
            .checked_div(peer.conf.max_fails)
        {
            st.effective_weight -= i64::from(step);
            if st.fails >= peer.conf.max_fails {
                tracing::warn!(upstream = %self.name, peer = %peer.conf.addr, "upstream server temporarily disabled");
            }
        }
        st.effective_weight = st.effective_weight.max(0);
    }

    /// Server `id` with what the API shows for it.
    pub fn status_of(&self, id: u64) -> Result<(Arc<Peer>, PeerStatus), UpstreamError> {
        let peers = self.lock();
        let i = (0..peers.list.len())
            .find(|&i| peers.list[i].id == id)
            .ok_or_else(|| self.no_such(id))?;
        Ok((peers.list[i].clone(), peers.status(i, Instant::now())))
    }

    /// Every current peer with what the API shows for it.
    pub fn statuses(&self) -> Vec<(Arc<Peer>, PeerStatus)> {
        let peers = self.lock();
        let now = Instant::now();
        (0..peers.list.len())
            .map(|i| (peers.list[i].clone(), peers.status(i, now)))
            .collect()
    }
}

impl Peers {
    fn status(&self, i: usize, now: Instant) -> PeerStatus {
        let (p, st) = (&self.list[i], &self.state[i]);
        if p.admin_down.load(Ordering::Relaxed) {
            PeerStatus::Down
        } else if p.draining.load(Ordering::Relaxed) {
            PeerStatus::Draining
        } else if !p.healthy.load(Ordering::Relaxed) {
            PeerStatus::Unhealthy
        } else if p.conf.max_fails > 0
            && st.fails >= p.conf.max_fails
            && st
                .checked
                .is_some_and(|c| now.duration_since(c) <= p.conf.fail_timeout)
        {
            PeerStatus::Unavail
        } else {
            PeerStatus::Up
        }
    }

    fn available(&self, i: usize, now: Instant, tried: &[u64]) -> bool {
        let p = &self.list[i];
        !tried.contains(&p.id)
            && self.status(i, now) == PeerStatus::Up
            && (p.conf.max_conns == 0 || p.active.load(Ordering::Relaxed) < p.conf.max_conns)
    }

    fn candidates(&self, now: Instant, tried: &[u64], backup: bool) -> Vec<usize> {
        (0..self.list.len())
            .filter(|&i| self.list[i].conf.backup == backup && self.available(i, now, tried))
            .collect()
    }

    fn weight(&self, i: usize) -> u32 {
        self.list[i].weight.load(Ordering::Relaxed)
    }

    /// nginx's smooth weighted round robin over `among`.
    fn smooth(&mut self, among: &[usize]) -> Option<usize> {
        let mut total = 0;
        let mut best: Option<usize> = None;
        for &i in among {
            let weight = i64::from(self.weight(i));
            let st = &mut self.state[i];
            st.current_weight += st.effective_weight;
            total += st.effective_weight;
            if st.effective_weight < weight {
                st.effective_weight += 1;
            }
            let current = st.current_weight;
            if best.is_none_or(|b| current > self.state[b].current_weight) {
                best = Some(i);
            }
        }
        let best = best?;
        self.state[best].current_weight -= total;
        Some(best)
    }

    fn round_robin(&mut self, now: Instant, tried: &[u64], backup: bool) -> Option<usize> {
        let among = self.candidates(now, tried, backup);
        self.smooth(&among)
    }

    /// (active sessions, weight) of peer `i`: least_conn compares their ratios.
    fn load(&self, i: usize) -> (u64, u64) {
        let p = &self.list[i];
        (
            u64::from(p.active.load(Ordering::Relaxed)),
            u64::from(self.weight(i).max(1)),
        )
    }

    fn least_conn(&mut self, now: Instant, tried: &[u64], backup: bool) -> Option<usize> {
        let among = self.candidates(now, tried, backup);
        let best = among.iter().copied().min_by(|&a, &b| {
            let ((ca, wa), (cb, wb)) = (self.load(a), self.load(b));
            (ca * wb).cmp(&(cb * wa))
        })?;
        let (cb, wb) = self.load(best);
        let tied: Vec<usize> = among
            .into_iter()
            .filter(|&i| {
                let (c, w) = self.load(i);
                c * wb == cb * w
            })
            .collect();
        self.smooth(&tied)
    }

    fn total_weight(&self) -> u64 {
        (0..self.list.len())
            .filter(|&i| !self.list[i].conf.backup)
            .map(|i| u64::from(self.weight(i)))
            .sum()
    }

    /// Cache::Memcached compatible: `((crc32([REHASH] KEY) >> 16) & 0x7fff) + PREV`.
    fn hash(&self, now: Instant, key: &[u8], tried: &[u64]) -> Option<usize> {
        let total = self.total_weight();
        if total == 0 {
            return None;
        }
        let mut acc: u64 = 0;
        for rehash in 0..HASH_TRIES {
            let mut h = crc32fast::Hasher::new();
            if rehash > 0 {
                h.update(rehash.to_string().as_bytes());
            }
            h.update(key);
            acc += u64::from((h.finalize() >> 16) & 0x7fff);
            let mut w = acc % total;
            for i in 0..self.list.len() {
                let weight = u64::from(self.weight(i));
                if w < weight {
                    if self.available(i, now, tried) {
                        return Some(i);
                    }
                    break;
                }
                w -= weight;
            }
        }
        None
    }

    fn consistent(&self, now: Instant, key: &[u8], tried: &[u64]) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let hash = crc32fast::hash(key);
        let start = self.points.partition_point(|&(h, _)| h < hash);
        (0..HASH_TRIES as usize)
            .map(|k| self.points[(start + k) % self.points.len()].1)
            .find(|&i| self.available(i, now, tried))
    }

    /// `random` picks by weight; `random two` picks two and keeps the less
    /// loaded one (least_conn is the only, and default, comparison).
    fn random(&self, now: Instant, tried: &[u64], two: bool) -> Option<usize> {
        let among = self.candidates(now, tried, false);
        let first = self.weighted_pick(&among, None)?;
        if !two {
            return Some(first);
        }
        let Some(second) = self.weighted_pick(&among, Some(first)) else {
            return Some(first);
        };
        let ((ca, wa), (cb, wb)) = (self.load(first), self.load(second));
        Some(if cb * wa < ca * wb { second } else { first })
    }

    fn weighted_pick(&self, among: &[usize], except: Option<usize>) -> Option<usize> {
        let pool: Vec<usize> = among
            .iter()
            .copied()
            .filter(|&i| Some(i) != except)
            .collect();
        let total: u64 = pool.iter().map(|&i| u64::from(self.weight(i))).sum();
        if total == 0 {
            return None;
        }
        let mut r = fastrand::u64(0..total);
        for &i in &pool {
            let w = u64::from(self.weight(i));
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }
}

impl Peer {
    pub fn new(id: u64, conf: &PeerConf) -> Peer {
        Peer {
            id,
            conf: conf.clone(),
            weight: AtomicU32::new(conf.weight),
            active: AtomicU32::new(0),
            admin_down: AtomicBool::new(conf.down),
            draining: AtomicBool::new(conf.drain),
            healthy: AtomicBool::new(true),
            check_fails: AtomicU32::new(0),
            check_passes: AtomicU32::new(0),
            connections: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }
}

impl Peer {
    /// The `server` line as the API has changed it (weight, down, drain).
    pub fn current_conf(&self) -> PeerConf {
        PeerConf {
            weight: self.weight.load(Ordering::Relaxed),
            down: self.admin_down.load(Ordering::Relaxed),
            drain: self.draining.load(Ordering::Relaxed),
            ..self.conf.clone()
        }
    }
}

/// One `server` line of a state file, in the syntax the config reads back.
fn state_line(c: &PeerConf) -> String {
    let mut line = format!(
        "server {} weight={} max_fails={} fail_timeout={} max_conns={}",
        c.name,
        c.weight,
        c.max_fails,
        duration_text(c.fail_timeout),
        c.max_conns
    );
    for (on, flag) in [(c.backup, "backup"), (c.down, "down"), (c.drain, "drain")] {
        if on {
            let _ = write!(line, " {flag}");
        }
    }
    line.push_str(";\n");
    line
}

fn duration_text(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)
}

/// nginx's ketama ring: `crc32(HOST \0 PORT PREV_HASH)`, 160 points per weight.
fn ketama_points(peers: &[Arc<Peer>]) -> Vec<(u32, usize)> {
    let mut points = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        let s = &p.conf;
        let (host, port) = s.name.rsplit_once(':').unwrap_or((&s.name, ""));
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut base = Vec::with_capacity(host.len() + port.len() + 1);
        base.extend_from_slice(host.as_bytes());
        base.push(0);
        base.extend_from_slice(port.as_bytes());
        let mut prev: u32 = 0;
        for _ in 0..s.weight * POINTS_PER_WEIGHT {
            let mut h = crc32fast::Hasher::new();
            h.update(&base);
            h.update(&prev.to_le_bytes());
            prev = h.finalize();
            points.push((prev, i));
        }
    }
    points.sort_unstable();
    points
}

#[cfg(test)]
mod tests;
