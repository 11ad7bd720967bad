//! What oxvirt writes to and reads from cgroup v2 interface files, checked
//! against a folder tree laid out like a v2 domain group. This machine's
//! cgroup2 mount has no controllers (they are all bound to v1), so the v2
//! controller files cannot be exercised for real here; the real v2 mount is
//! still used by the hybrid tests in tests/cgroup.rs (threaded children,
//! `cgroup.threads`, `cgroup.kill`).

use std::fs;
use std::path::PathBuf;

use host::cgroup::{
    weight_to_shares, DeviceNumber, DomainCgroup, Layout, MemoryLimits, ParentGroup, Scope,
    ThrottleKind,
};
use host::size::{parse_bytes, parse_cpus, MemorySwap};

struct Tree(PathBuf);

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn v2_tree(test: &str) -> Tree {
    let root = std::env::temp_dir().join(format!("oxvirt-v2-{test}-{}", std::process::id()));
    let domain = root.join("oxvirt/vm");
    let per_thread = [
        ("cgroup.threads", ""),
        ("cgroup.type", "threaded"),
        ("cpu.weight", "100"),
        ("cpu.max", "max 100000"),
        ("cpu.stat", "usage_usec 7\nuser_usec 5\nsystem_usec 2\n"),
        ("cpuset.cpus", ""),
        ("cpuset.cpus.effective", "0-1"),
        ("cpuset.mems", ""),
        ("cpuset.mems.effective", "0"),
    ];
    let domain_only = [
        ("cgroup.controllers", "cpuset cpu io memory pids"),
        ("cgroup.procs", ""),
        ("memory.max", "max"),
        ("memory.swap.max", "max"),
        ("memory.low", "0"),
        ("memory.current", "4096"),
        ("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"),
        ("io.max", ""),
        ("io.weight", "default 100"),
        ("pids.max", "max"),
        ("pids.current", "3"),
    ];
    for dir in [
        domain.clone(),
        domain.join("emulator"),
        domain.join("vcpu0"),
    ] {
        fs::create_dir_all(&dir).unwrap();
        for (file, text) in per_thread {
            fs::write(dir.join(file), text).unwrap();
        }
    }
    for (file, text) in domain_only {
        fs::write(domain.join(file), text).unwrap();
    }
    Tree(root)
}

fn file(tree: &Tree, name: &str) -> String {
    fs::read_to_string(tree.0.join("oxvirt/vm").join(name)).unwrap()
}

fn open(tree: &Tree) -> DomainCgroup {
    let mountinfo = format!("1 0 0:1 / {} rw - cgroup2 cgroup2 rw\n", tree.0.display());
    let layout = Layout::parse(&mountinfo, "0::/\n").unwrap();
    DomainCgroup::open(&layout, &ParentGroup::default_for(&layout), "vm", 1).unwrap()
}

#[test]
fn cpu_settings_use_weight_and_cpu_max() {
    let tree = v2_tree("cpu");
    let d = open(&tree);
    d.set_cpu_shares(Scope::Domain, 1024).unwrap();
    assert_eq!(file(&tree, "cpu.weight"), "39");
    assert_eq!(
        d.cpu_limits(Scope::Domain).unwrap().shares,
        weight_to_shares(39)
    );
    d.set_cpu_quota(Scope::Vcpu(0), Some(parse_cpus("0.5").unwrap()))
        .unwrap();
    assert_eq!(file(&tree, "vcpu0/cpu.max"), "50000 100000");
    let v0 = d.cpu_limits(Scope::Vcpu(0)).unwrap();
    assert_eq!((v0.quota_us, v0.period_us), (Some(50_000), 100_000));
    d.set_cpu_quota(Scope::Vcpu(0), None).unwrap();
    assert_eq!(file(&tree, "vcpu0/cpu.max"), "max");
    // An empty cpuset means "the parent's": the effective set is reported.
    assert_eq!(d.cpu_limits(Scope::Domain).unwrap().cpus.to_string(), "0-1");
    d.set_cpuset_cpus(Scope::Domain, &"1".parse().unwrap())
        .unwrap();
    assert_eq!(file(&tree, "cpuset.cpus"), "1");
    assert_eq!(
        file(&tree, "vcpu0/cpuset.cpus"),
        "",
        "v2 children need no update"
    );
    assert_eq!(d.cpu_usage_ns(Scope::Domain).unwrap(), 7000);
}

#[test]
fn memory_follows_dockers_swap_rules_as_swap_max() {
    let tree = v2_tree("memory");
    let d = open(&tree);
    let mem = parse_bytes("64m").unwrap();
    let limits = MemoryLimits {
        limit: Some(mem),
        soft: Some(parse_bytes("16m").unwrap()),
        swap: MemorySwap::Unset,
    };
    d.set_memory(&limits).unwrap();
    assert_eq!(file(&tree, "memory.max"), mem.to_string());
    assert_eq!(
        file(&tree, "memory.swap.max"),
        mem.to_string(),
        "memsw 2x minus memory"
    );
    assert_eq!(file(&tree, "memory.low"), (16 << 20).to_string());
    let back = d.memory_limits().unwrap();
    assert_eq!(back.swap, MemorySwap::Limit(2 * mem));
    assert_eq!(back.soft, Some(16 << 20));
    d.set_memory(&MemoryLimits {
        limit: Some(mem),
        soft: None,
        swap: MemorySwap::Unlimited,
    })
    .unwrap();
    assert_eq!(file(&tree, "memory.swap.max"), "max");
    let stats = d.stats().unwrap();
    assert_eq!(
        (stats.memory_usage, stats.oom_kills, stats.pids),
        (Some(4096), Some(1), Some(3))
    );
}

#[test]
fn io_pids_and_threads() {
    let tree = v2_tree("io");
    let d = open(&tree);
    let dev = DeviceNumber {
        major: 254,
        minor: 0,
    };
    d.set_throttle(dev, ThrottleKind::ReadBps, Some(1 << 20))
        .unwrap();
    assert_eq!(file(&tree, "io.max"), "254:0 rbps=1048576");
    let io = d.io_limits().unwrap();
    assert_eq!(io.throttles.len(), 1);
    assert_eq!(io.throttles[0].limit, 1 << 20);
    d.set_throttle(dev, ThrottleKind::ReadBps, None).unwrap();
    assert_eq!(file(&tree, "io.max"), "254:0 rbps=max");
    d.set_blkio_weight(500).unwrap();
    assert_eq!(file(&tree, "io.weight"), "default 4950");
    assert_eq!(d.io_limits().unwrap().weight, Some(500));
    d.set_pids_limit(Some(10)).unwrap();
    assert_eq!(file(&tree, "pids.max"), "10");
    d.attach_thread(Scope::Vcpu(0), 4242).unwrap();
    assert_eq!(file(&tree, "vcpu0/cgroup.threads"), "4242");
}
