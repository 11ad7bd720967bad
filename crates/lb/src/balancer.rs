//! Upstream peer selection, as nginx does it: smooth weighted round robin,
//! least_conn, hash (Cache::Memcached compatible) and consistent hash (ketama),
//! random and random two; passive health (max_fails/fail_timeout), backup,
//! down, max_conns, plus runtime state (health checks, drain, API weight).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::config::{Method, PeerConf, UpstreamConf};

/// nginx gives up rehashing after this many tries and falls back to round robin.
const HASH_TRIES: u32 = 20;
/// Ketama points per unit of weight (nginx's value).
const POINTS_PER_WEIGHT: u32 = 160;

/// One upstream server and its live counters.
#[derive(Debug)]
pub struct Peer {
    pub conf: PeerConf,
    pub weight: AtomicU32,
    pub active: AtomicU32,
    pub admin_down: AtomicBool,
    pub draining: AtomicBool,
    /// Result of active health checks (true until a check says otherwise).
    pub healthy: AtomicBool,
    pub connections: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub failures: AtomicU64,
}

/// Passive-health and round-robin state, guarded by one lock per upstream.
#[derive(Debug, Clone, Default)]
struct PeerState {
    current_weight: i64,
    effective_weight: i64,
    fails: u32,
    checked: Option<Instant>,
}

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    method: Method,
    pub peers: Vec<Peer>,
    /// (hash, peer index), sorted, for `hash ... consistent`.
    points: Vec<(u32, usize)>,
    state: Mutex<Vec<PeerState>>,
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
    pub fn new(conf: &UpstreamConf) -> Upstream {
        let peers: Vec<Peer> = conf.servers.iter().map(Peer::new).collect();
        let state = conf
            .servers
            .iter()
            .map(|p| PeerState {
                effective_weight: i64::from(p.weight),
                ..PeerState::default()
            })
            .collect();
        let points = match conf.method {
            Method::Hash {
                consistent: true, ..
            } => ketama_points(&conf.servers),
            _ => Vec::new(),
        };
        Upstream {
            name: conf.name.clone(),
            method: conf.method.clone(),
            peers,
            points,
            state: Mutex::new(state),
        }
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<PeerState>> {
        // A panic while holding this lock cannot leave the counters inconsistent
        // in a way that matters more than refusing all traffic would.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Picks a peer not yet `tried` for a session with hash key `key`, and
    /// counts a connection on it. `None` when no peer is available.
    pub fn select(&self, key: &[u8], tried: &[bool]) -> Option<usize> {
        let mut state = self.lock();
        let now = Instant::now();
        let choice = match &self.method {
            Method::RoundRobin => self.round_robin(&mut state, now, tried, false),
            Method::LeastConn => self.least_conn(&mut state, now, tried, false),
            Method::Hash {
                consistent: false, ..
            } => self.hash(&mut state, now, key, tried),
            Method::Hash {
                consistent: true, ..
            } => self.consistent(&mut state, now, key, tried),
            Method::Random { two, .. } => self.random(&mut state, now, tried, *two),
        };
        // Hash and random fall back to round robin, as nginx does after 20 tries;
        // backups serve only when no primary can.
        let choice = choice
            .or_else(|| match self.method {
                Method::Hash { .. } | Method::Random { .. } => {
                    self.round_robin(&mut state, now, tried, false)
                }
                _ => None,
            })
            .or_else(|| match self.method {
                Method::LeastConn => self.least_conn(&mut state, now, tried, true),
                _ => self.round_robin(&mut state, now, tried, true),
            })?;
        if self.peers[choice].conf.max_fails > 0 {
            let st = &mut state[choice];
            if st
                .checked
                .is_some_and(|c| now.duration_since(c) > self.peers[choice].conf.fail_timeout)
            {
                st.checked = Some(now);
            }
        }
        let peer = &self.peers[choice];
        peer.active.fetch_add(1, Ordering::Relaxed);
        peer.connections.fetch_add(1, Ordering::Relaxed);
        Some(choice)
    }

    /// Ends a connection attempt or session on `peer`; `failed` counts towards max_fails.
    pub fn release(&self, peer: usize, failed: bool) {
        let p = &self.peers[peer];
        p.active.fetch_sub(1, Ordering::Relaxed);
        let mut state = self.lock();
        let st = &mut state[peer];
        if failed {
            p.failures.fetch_add(1, Ordering::Relaxed);
            st.fails += 1;
            st.checked = Some(Instant::now());
            if let Some(step) = p
                .weight
                .load(Ordering::Relaxed)
                .checked_div(p.conf.max_fails)
            {
                st.effective_weight -= i64::from(step);
                if st.fails >= p.conf.max_fails {
                    tracing::warn!(upstream = %self.name, peer = %p.conf.addr, "upstream server temporarily disabled");
                }
            }
            st.effective_weight = st.effective_weight.max(0);
        } else {
            st.fails = 0;
        }
    }

    /// What the API shows for a peer.
    pub fn status(&self, peer: usize) -> PeerStatus {
        let state = self.lock();
        self.peer_status(&state[peer], peer, Instant::now())
    }

    fn peer_status(&self, st: &PeerState, i: usize, now: Instant) -> PeerStatus {
        let p = &self.peers[i];
        if p.conf.down || p.admin_down.load(Ordering::Relaxed) {
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

    fn available(&self, state: &[PeerState], i: usize, now: Instant, tried: &[bool]) -> bool {
        let p = &self.peers[i];
        !tried.get(i).copied().unwrap_or(false)
            && self.peer_status(&state[i], i, now) == PeerStatus::Up
            && (p.conf.max_conns == 0 || p.active.load(Ordering::Relaxed) < p.conf.max_conns)
    }

    fn candidates(
        &self,
        state: &[PeerState],
        now: Instant,
        tried: &[bool],
        backup: bool,
    ) -> Vec<usize> {
        (0..self.peers.len())
            .filter(|&i| {
                self.peers[i].conf.backup == backup && self.available(state, i, now, tried)
            })
            .collect()
    }

    /// nginx's smooth weighted round robin over `among`.
    fn smooth(&self, state: &mut [PeerState], among: &[usize]) -> Option<usize> {
        let mut total = 0;
        let mut best: Option<usize> = None;
        for &i in among {
            let weight = i64::from(self.peers[i].weight.load(Ordering::Relaxed));
            let st = &mut state[i];
            st.current_weight += st.effective_weight;
            total += st.effective_weight;
            if st.effective_weight < weight {
                st.effective_weight += 1;
            }
            let current = st.current_weight;
            if best.is_none_or(|b| current > state[b].current_weight) {
                best = Some(i);
            }
        }
        let best = best?;
        state[best].current_weight -= total;
        Some(best)
    }

    fn round_robin(
        &self,
        state: &mut [PeerState],
        now: Instant,
        tried: &[bool],
        backup: bool,
    ) -> Option<usize> {
        let among = self.candidates(state, now, tried, backup);
        self.smooth(state, &among)
    }

    fn least_conn(
        &self,
        state: &mut [PeerState],
        now: Instant,
        tried: &[bool],
        backup: bool,
    ) -> Option<usize> {
        let among = self.candidates(state, now, tried, backup);
        let load = |i: usize| {
            let p = &self.peers[i];
            (
                u64::from(p.active.load(Ordering::Relaxed)),
                u64::from(p.weight.load(Ordering::Relaxed).max(1)),
            )
        };
        let best = among.iter().copied().min_by(|&a, &b| {
            let ((ca, wa), (cb, wb)) = (load(a), load(b));
            (ca * wb).cmp(&(cb * wa))
        })?;
        let (cb, wb) = load(best);
        let tied: Vec<usize> = among
            .into_iter()
            .filter(|&i| {
                let (c, w) = load(i);
                c * wb == cb * w
            })
            .collect();
        self.smooth(state, &tied)
    }

    fn total_weight(&self) -> u64 {
        self.peers
            .iter()
            .filter(|p| !p.conf.backup)
            .map(|p| u64::from(p.weight.load(Ordering::Relaxed)))
            .sum()
    }

    /// Cache::Memcached compatible: `((crc32([REHASH] KEY) >> 16) & 0x7fff) + PREV`.
    fn hash(
        &self,
        state: &mut [PeerState],
        now: Instant,
        key: &[u8],
        tried: &[bool],
    ) -> Option<usize> {
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
            for (i, p) in self.peers.iter().enumerate() {
                let weight = u64::from(p.weight.load(Ordering::Relaxed));
                if w < weight {
                    if self.available(state, i, now, tried) {
                        return Some(i);
                    }
                    break;
                }
                w -= weight;
            }
        }
        None
    }

    fn consistent(
        &self,
        state: &mut [PeerState],
        now: Instant,
        key: &[u8],
        tried: &[bool],
    ) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let hash = crc32fast::hash(key);
        let start = self.points.partition_point(|&(h, _)| h < hash);
        (0..HASH_TRIES as usize)
            .map(|k| self.points[(start + k) % self.points.len()].1)
            .find(|&i| self.available(state, i, now, tried))
    }

    /// `random` picks by weight; `random two` picks two and keeps the less
    /// loaded one (least_conn is the only, and default, comparison).
    fn random(
        &self,
        state: &mut [PeerState],
        now: Instant,
        tried: &[bool],
        two: bool,
    ) -> Option<usize> {
        let among = self.candidates(state, now, tried, false);
        let first = self.weighted_pick(&among, None)?;
        if !two {
            return Some(first);
        }
        let Some(second) = self.weighted_pick(&among, Some(first)) else {
            return Some(first);
        };
        let cost = |i: usize| {
            let p = &self.peers[i];
            (
                u64::from(p.active.load(Ordering::Relaxed)),
                u64::from(p.weight.load(Ordering::Relaxed).max(1)),
            )
        };
        let ((ca, wa), (cb, wb)) = (cost(first), cost(second));
        Some(if cb * wa < ca * wb { second } else { first })
    }

    fn weighted_pick(&self, among: &[usize], except: Option<usize>) -> Option<usize> {
        let pool: Vec<usize> = among
            .iter()
            .copied()
            .filter(|&i| Some(i) != except)
            .collect();
        let total: u64 = pool
            .iter()
            .map(|&i| u64::from(self.peers[i].weight.load(Ordering::Relaxed)))
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = fastrand::u64(0..total);
        for &i in &pool {
            let w = u64::from(self.peers[i].weight.load(Ordering::Relaxed));
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }
}

impl Peer {
    fn new(conf: &PeerConf) -> Peer {
        Peer {
            conf: conf.clone(),
            weight: AtomicU32::new(conf.weight),
            active: AtomicU32::new(0),
            admin_down: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            healthy: AtomicBool::new(true),
            connections: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }
}

/// nginx's ketama ring: `crc32(HOST \0 PORT PREV_HASH)`, 160 points per weight.
fn ketama_points(servers: &[PeerConf]) -> Vec<(u32, usize)> {
    let mut points = Vec::new();
    for (i, s) in servers.iter().enumerate() {
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
