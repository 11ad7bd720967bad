use std::collections::HashMap;
use std::time::Duration;

use super::*;
use crate::vars::Template;

fn peer(port: u16, weight: u32) -> PeerConf {
    PeerConf {
        name: format!("127.0.0.1:{port}"),
        addr: format!("127.0.0.1:{port}").parse().unwrap(),
        weight,
        max_fails: 1,
        fail_timeout: Duration::from_secs(10),
        backup: false,
        down: false,
        drain: false,
        max_conns: 0,
    }
}

fn upstream(method: Method, servers: Vec<PeerConf>) -> Upstream {
    let loc = crate::config::Location {
        file: std::sync::Arc::new("t".into()),
        line: 1,
    };
    Upstream::new(
        &UpstreamConf {
            name: "u".into(),
            method,
            servers,
            state: None,
            loc,
        },
        None,
    )
}

/// Picks a peer and returns its index (ids are 0.. in configuration order).
fn pick(u: &Upstream, key: &[u8], tried: &[u64]) -> Option<usize> {
    u.select(key, tried).map(|p| p.id as usize)
}

fn release(u: &Upstream, i: usize, failed: bool) {
    let p = u.find(i as u64).unwrap();
    u.release(&p, failed);
}

fn status(u: &Upstream, i: usize) -> PeerStatus {
    u.statuses()[i].1
}

fn hash_method(consistent: bool) -> Method {
    Method::Hash {
        key: Template::parse("$remote_addr").unwrap(),
        consistent,
    }
}

/// Selects and immediately releases `n` times; returns picks per peer.
fn counts(u: &Upstream, n: usize, key: impl Fn(usize) -> String) -> Vec<usize> {
    let mut out = vec![0; u.peers().len()];
    for i in 0..n {
        let p = u.select(key(i).as_bytes(), &[]).unwrap();
        u.release(&p, false);
        out[p.id as usize] += 1;
    }
    out
}

/// Each share within `tol` (absolute fraction) of weight / total.
fn assert_shares(got: &[usize], weights: &[u32], tol: f64) {
    let n: usize = got.iter().sum();
    let total: u32 = weights.iter().sum();
    for (g, w) in got.iter().zip(weights) {
        let share = *g as f64 / n as f64;
        let want = f64::from(*w) / f64::from(total);
        assert!(
            (share - want).abs() < tol,
            "got {got:?} for weights {weights:?}"
        );
    }
}

#[test]
fn smooth_round_robin_matches_nginx_sequence() {
    let u = upstream(Method::RoundRobin, vec![peer(1, 5), peer(2, 1), peer(3, 1)]);
    let seq: Vec<usize> = (0..7)
        .map(|_| {
            let p = pick(&u, b"", &[]).unwrap();
            release(&u, p, false);
            p
        })
        .collect();
    assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    assert_eq!(counts(&u, 7000, |_| String::new()), [5000, 1000, 1000]);
}

#[test]
fn least_conn_prefers_fewer_connections_per_weight() {
    let u = upstream(Method::LeastConn, vec![peer(1, 1), peer(2, 2), peer(3, 1)]);
    let held: Vec<usize> = (0..400).map(|_| pick(&u, b"", &[]).unwrap()).collect();
    let mut per = [0; 3];
    held.iter().for_each(|&p| per[p] += 1);
    assert_eq!(per, [100, 200, 100]);
    for _ in 0..50 {
        release(&u, held[0], false);
        let again = pick(&u, b"", &[]).unwrap();
        assert_eq!(
            again, held[0],
            "the peer that just freed a slot must be picked"
        );
    }
}

#[test]
fn hash_distribution_follows_weights_and_is_sticky() {
    let u = upstream(hash_method(false), vec![peer(1, 1), peer(2, 3)]);
    let got = counts(&u, 20000, |i| {
        format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)
    });
    assert_shares(&got, &[1, 3], 0.03);
    let first = pick(&u, b"192.0.2.7", &[]).unwrap();
    for _ in 0..20 {
        assert_eq!(pick(&u, b"192.0.2.7", &[]).unwrap(), first);
    }
}

#[test]
fn consistent_hash_distribution_and_quarter_remap() {
    let four: Vec<PeerConf> = (1..=4).map(|p| peer(8000 + p, 1)).collect();
    let u4 = upstream(hash_method(true), four.clone());
    let u3 = upstream(hash_method(true), four[..3].to_vec());
    let key = |i: usize| format!("198.51.{}.{}", i / 256, i % 256);
    let got = counts(&u4, 20000, key);
    assert_shares(&got, &[1, 1, 1, 1], 0.06);
    let mut moved = 0;
    let n = 20000;
    for i in 0..n {
        let k = key(i);
        let a = pick(&u4, k.as_bytes(), &[]).unwrap();
        let b = pick(&u3, k.as_bytes(), &[]).unwrap();
        if a != 3 {
            assert_eq!(a, b, "key {k} moved although its server stayed");
        } else {
            moved += 1;
        }
    }
    let share = moved as f64 / n as f64;
    assert!((0.18..0.32).contains(&share), "remapped {share}");
}

#[test]
fn random_and_random_two() {
    let u = upstream(
        Method::Random {
            two: false,
            least_conn: false,
        },
        vec![peer(1, 1), peer(2, 4)],
    );
    assert_shares(&counts(&u, 20000, |_| String::new()), &[1, 4], 0.02);
    let u = upstream(
        Method::Random {
            two: true,
            least_conn: true,
        },
        vec![peer(1, 1), peer(2, 1), peer(3, 1)],
    );
    let held: Vec<usize> = (0..300).map(|_| pick(&u, b"", &[]).unwrap()).collect();
    let mut per = [0usize; 3];
    held.iter().for_each(|&p| per[p] += 1);
    let (lo, hi) = (per.iter().min().unwrap(), per.iter().max().unwrap());
    assert!(hi - lo <= 6, "random two should keep loads even: {per:?}");
}

#[test]
fn max_fails_backup_down_and_max_conns() {
    let mut backup = peer(3, 1);
    backup.backup = true;
    let mut down = peer(4, 1);
    down.down = true;
    let u = upstream(
        Method::RoundRobin,
        vec![peer(1, 1), peer(2, 1), backup, down],
    );
    let got = counts(&u, 100, |_| String::new());
    assert_eq!(got, [50, 50, 0, 0]);
    let p = pick(&u, b"", &[]).unwrap();
    release(&u, p, true);
    assert_eq!(status(&u, p), PeerStatus::Unavail);
    let got = counts(&u, 10, |_| String::new());
    assert_eq!(got[p], 0);
    let other = 1 - p;
    let q = pick(&u, b"", &[]).unwrap();
    assert_eq!(q, other);
    release(&u, q, true);
    assert_eq!(
        counts(&u, 10, |_| String::new()),
        [0, 0, 10, 0],
        "backup takes over"
    );
    u.peers()[2].admin_down.store(true, Ordering::Relaxed);
    assert_eq!(pick(&u, b"", &[]), None);

    let mut limited = peer(1, 1);
    limited.max_conns = 2;
    let u = upstream(Method::RoundRobin, vec![limited]);
    let a = pick(&u, b"", &[]).unwrap();
    let _b = pick(&u, b"", &[]).unwrap();
    assert_eq!(pick(&u, b"", &[]), None);
    release(&u, a, false);
    assert!(pick(&u, b"", &[]).is_some());
}

#[test]
fn tried_peers_are_skipped_and_unhealthy_excluded() {
    let u = upstream(Method::RoundRobin, vec![peer(1, 1), peer(2, 1), peer(3, 1)]);
    assert_eq!(pick(&u, b"", &[0, 1]), Some(2));
    u.peers()[0].healthy.store(false, Ordering::Relaxed);
    u.peers()[1].draining.store(true, Ordering::Relaxed);
    let got = counts(&u, 9, |_| String::new());
    assert_eq!(got, [0, 0, 9]);
    assert_eq!(status(&u, 1), PeerStatus::Draining);
    let by_status: HashMap<usize, PeerStatus> = (0..3).map(|i| (i, status(&u, i))).collect();
    assert_eq!(by_status[&0], PeerStatus::Unhealthy);
}

#[test]
fn reload_keeps_unchanged_peers_with_their_state() {
    let old = upstream(Method::RoundRobin, vec![peer(1, 1), peer(2, 1), peer(3, 1)]);
    let held = old.select(b"", &[1, 2]).unwrap();
    old.peers()[1].healthy.store(false, Ordering::Relaxed);
    release(&old, 2, true);
    // Line 1 unchanged, line 2 unchanged, line 3 now weight=2, a new line 4.
    let conf = UpstreamConf {
        name: "u".into(),
        method: Method::LeastConn,
        servers: vec![peer(1, 1), peer(2, 1), peer(3, 2), peer(4, 1)],
        state: None,
        loc: crate::config::Location {
            file: std::sync::Arc::new("t".into()),
            line: 1,
        },
    };
    let new = Upstream::new(&conf, Some(&old));
    let peers = new.peers();
    assert!(
        Arc::ptr_eq(&peers[0], &held),
        "unchanged line keeps its peer"
    );
    assert_eq!(peers[0].active.load(Ordering::Relaxed), 1);
    assert_eq!(status(&new, 1), PeerStatus::Unhealthy, "health carried");
    let ids: Vec<u64> = peers.iter().map(|p| p.id).collect();
    assert_eq!(ids, [0, 1, 3, 4], "changed and new lines get fresh ids");
    assert_eq!(peers[2].failures.load(Ordering::Relaxed), 0);
    // An old-generation session ending is seen by the new generation.
    old.release(&held, false);
    assert_eq!(peers[0].active.load(Ordering::Relaxed), 0);
}

#[test]
fn servers_added_and_removed_at_run_time() {
    let u = upstream(
        hash_method(true),
        (1..=3).map(|p| peer(8000 + p, 1)).collect(),
    );
    let key = |i: usize| format!("203.0.{}.{}", i / 256, i % 256);
    let before: Vec<usize> = (0..8000)
        .map(|i| pick(&u, key(i).as_bytes(), &[]).unwrap())
        .collect();
    let added = u.add(peer(8004, 1), false, false).unwrap();
    assert_eq!(added.id, 3);
    let after: Vec<usize> = (0..8000)
        .map(|i| pick(&u, key(i).as_bytes(), &[]).unwrap())
        .collect();
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert!(
        before.iter().zip(&after).all(|(a, b)| a == b || *b == 3),
        "keys moved between old servers"
    );
    assert!((1400..2600).contains(&moved), "{moved} of 8000 keys moved");
    assert_eq!(u.remove(1).unwrap().id, 1);
    assert!((0..2000).all(|i| pick(&u, key(i).as_bytes(), &[]) != Some(1)));
    assert_eq!(
        u.remove(1).unwrap_err(),
        UpstreamError::NoSuchServer {
            upstream: "u".into(),
            id: 1
        }
    );
    let mut backup = peer(9, 1);
    backup.backup = true;
    assert!(matches!(
        u.add(backup, false, false),
        Err(UpstreamError::BackupNeedsRoundRobin(_))
    ));
    assert!(matches!(
        u.add(peer(9, 0), false, false),
        Err(UpstreamError::ZeroWeight(_))
    ));
    // A removed peer's sessions still end cleanly.
    let rr = upstream(Method::RoundRobin, vec![peer(1, 1), peer(2, 1)]);
    let p = rr.select(b"", &[1]).unwrap();
    rr.remove(0).unwrap();
    rr.release(&p, true);
    assert_eq!(p.active.load(Ordering::Relaxed), 0);
    assert!((0..4).all(|_| pick(&rr, b"", &[]) == Some(1)));
}
