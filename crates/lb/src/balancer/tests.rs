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
        max_conns: 0,
    }
}

fn upstream(method: Method, servers: Vec<PeerConf>) -> Upstream {
    let loc = crate::config::Location {
        file: std::sync::Arc::new("t".into()),
        line: 1,
    };
    Upstream::new(&UpstreamConf {
        name: "u".into(),
        method,
        servers,
        loc,
    })
}

fn hash_method(consistent: bool) -> Method {
    Method::Hash {
        key: Template::parse("$remote_addr").unwrap(),
        consistent,
    }
}

/// Selects and immediately releases `n` times; returns picks per peer.
fn counts(u: &Upstream, n: usize, key: impl Fn(usize) -> String) -> Vec<usize> {
    let mut out = vec![0; u.peers.len()];
    let tried = vec![false; u.peers.len()];
    for i in 0..n {
        let p = u.select(key(i).as_bytes(), &tried).unwrap();
        u.release(p, false);
        out[p] += 1;
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
    let tried = [false; 3];
    let seq: Vec<usize> = (0..7)
        .map(|_| {
            let p = u.select(b"", &tried).unwrap();
            u.release(p, false);
            p
        })
        .collect();
    assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    assert_eq!(counts(&u, 7000, |_| String::new()), [5000, 1000, 1000]);
}

#[test]
fn least_conn_prefers_fewer_connections_per_weight() {
    let u = upstream(Method::LeastConn, vec![peer(1, 1), peer(2, 2), peer(3, 1)]);
    let tried = [false; 3];
    let held: Vec<usize> = (0..400).map(|_| u.select(b"", &tried).unwrap()).collect();
    let mut per = [0; 3];
    held.iter().for_each(|&p| per[p] += 1);
    assert_eq!(per, [100, 200, 100]);
    for _ in 0..50 {
        u.release(held[0], false);
        let again = u.select(b"", &tried).unwrap();
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
    let tried = [false; 2];
    let first = u.select(b"192.0.2.7", &tried).unwrap();
    for _ in 0..20 {
        assert_eq!(u.select(b"192.0.2.7", &tried).unwrap(), first);
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
    let (tried4, tried3) = ([false; 4], [false; 3]);
    let mut moved = 0;
    let n = 20000;
    for i in 0..n {
        let k = key(i);
        let a = u4.select(k.as_bytes(), &tried4).unwrap();
        let b = u3.select(k.as_bytes(), &tried3).unwrap();
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
    let tried = [false; 3];
    let held: Vec<usize> = (0..300).map(|_| u.select(b"", &tried).unwrap()).collect();
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
    let tried = [false; 4];
    let got = counts(&u, 100, |_| String::new());
    assert_eq!(got, [50, 50, 0, 0]);
    let p = u.select(b"", &tried).unwrap();
    u.release(p, true);
    assert_eq!(u.status(p), PeerStatus::Unavail);
    let got = counts(&u, 10, |_| String::new());
    assert_eq!(got[p], 0);
    let other = 1 - p;
    let q = u.select(b"", &tried).unwrap();
    assert_eq!(q, other);
    u.release(q, true);
    assert_eq!(
        counts(&u, 10, |_| String::new()),
        [0, 0, 10, 0],
        "backup takes over"
    );
    u.peers[2].admin_down.store(true, Ordering::Relaxed);
    assert_eq!(u.select(b"", &tried), None);

    let mut limited = peer(1, 1);
    limited.max_conns = 2;
    let u = upstream(Method::RoundRobin, vec![limited]);
    let a = u.select(b"", &[false]).unwrap();
    let _b = u.select(b"", &[false]).unwrap();
    assert_eq!(u.select(b"", &[false]), None);
    u.release(a, false);
    assert!(u.select(b"", &[false]).is_some());
}

#[test]
fn tried_peers_are_skipped_and_unhealthy_excluded() {
    let u = upstream(Method::RoundRobin, vec![peer(1, 1), peer(2, 1), peer(3, 1)]);
    assert_eq!(u.select(b"", &[true, true, false]), Some(2));
    u.peers[0].healthy.store(false, Ordering::Relaxed);
    u.peers[1].draining.store(true, Ordering::Relaxed);
    let got = counts(&u, 9, |_| String::new());
    assert_eq!(got, [0, 0, 9]);
    assert_eq!(u.status(1), PeerStatus::Draining);
    let by_status: HashMap<usize, PeerStatus> = (0..3).map(|i| (i, u.status(i))).collect();
    assert_eq!(by_status[&0], PeerStatus::Unhealthy);
}
