//! `oxvirt run` with Docker's flags, schedinfo/memtune/vcpupin, observed in
//! this machine's cgroup files and in the guest's CPU use and OOM fate.

mod common;

use std::time::Duration;

use common::{prerequisites, read, Daemon};

const WAIT: Duration = Duration::from_secs(30);

fn probe() -> String {
    testkit::probe_binary().display().to_string()
}

/// CPU time of one vCPU group over `window`, as a fraction of one CPU.
fn vcpu_share(d: &Daemon, name: &str, window: Duration) -> f64 {
    let usage = d.cgroup_dir("cpuacct", name, "vcpu0").join("cpuacct.usage");
    let before: u64 = read(&usage).parse().unwrap();
    std::thread::sleep(window);
    let after: u64 = read(&usage).parse().unwrap();
    (after - before) as f64 / window.as_nanos() as f64
}

#[test]
fn heavy_run_flags_land_in_cgroups_and_change_live() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    let out = d.ok(&[
        "run",
        "--name",
        "lim",
        "--kernel",
        &probe(),
        "--cmdline",
        "probe=cpu probe.max_prime=100000 probe.events=1000000000",
        "--cpu-shares",
        "512",
        "--cpus",
        "0.5",
        "--cpuset-cpus",
        "0-1",
        "--memory",
        "256m",
        "--pids-limit",
        "64",
    ]);
    assert_eq!(out, "lim\n");
    let cpu = d.cgroup_dir("cpu", "lim", "");
    assert_eq!(read(&cpu.join("cpu.shares")), "512");
    assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "50000");
    assert_eq!(
        read(&d.cgroup_dir("cpuset", "lim", "").join("cpuset.cpus")),
        "0-1"
    );
    let limit: u64 = read(
        &d.cgroup_dir("memory", "lim", "")
            .join("memory.limit_in_bytes"),
    )
    .parse()
    .unwrap();
    assert_eq!(limit, (256 << 20) + daemon::run_spec::VMM_OVERHEAD);
    assert_eq!(
        read(&d.cgroup_dir("pids", "lim", "").join("pids.max")),
        "64"
    );
    assert_eq!(d.info("lim").memory, 256 << 20);

    // --cpus 0.5 holds the busy guest to half a CPU (less when the
    // machine's two cores are busy with other work).
    let share = vcpu_share(&d, "lim", Duration::from_secs(2));
    assert!((0.25..0.55).contains(&share), "--cpus 0.5 gave {share:.2}");

    // schedinfo changes the running domain: shares and a per-vCPU quota.
    let out = d.ok(&[
        "schedinfo",
        "lim",
        "--set",
        "cpu_shares=300",
        "--set",
        "vcpu_quota=20000",
        "--live",
    ]);
    assert!(
        out.contains("cpu_shares     : 300") && out.contains("vcpu_quota     : 20000"),
        "{out}"
    );
    assert_eq!(read(&cpu.join("cpu.shares")), "300");
    assert_eq!(
        read(&d.cgroup_dir("cpu", "lim", "vcpu0").join("cpu.cfs_quota_us")),
        "20000"
    );
    let share = vcpu_share(&d, "lim", Duration::from_secs(2));
    assert!(
        (0.1..0.23).contains(&share),
        "vcpu_quota 20000/100000 gave {share:.2}"
    );
    let out = d.ok(&["schedinfo", "lim", "--set", "vcpu_quota=-1"]);
    assert!(out.contains("vcpu_quota     : -1"), "{out}");

    // memtune: KiB like virsh, or sizes with units.
    let out = d.ok(&[
        "memtune",
        "lim",
        "--hard-limit",
        "300M",
        "--swap-hard-limit",
        "-1",
    ]);
    assert!(out.contains("hard_limit     : 307200"), "{out}");
    assert_eq!(
        read(
            &d.cgroup_dir("memory", "lim", "")
                .join("memory.limit_in_bytes")
        ),
        (300u64 << 20).to_string()
    );

    let out = d.ok(&["vcpupin", "lim", "0", "1", "--live"]);
    assert!(out.contains(" 0      1"), "{out}");
    assert_eq!(
        read(&d.cgroup_dir("cpuset", "lim", "vcpu0").join("cpuset.cpus")),
        "1"
    );

    // --config writes the definition; bad values are refused and change nothing.
    d.ok(&["schedinfo", "lim", "--set", "cpu_shares=700", "--config"]);
    assert!(d.ok(&["dumpconfig", "lim"]).contains("cpu_shares = 700"));
    assert_eq!(read(&cpu.join("cpu.shares")), "300");
    let err = d.fails(&[
        "schedinfo",
        "lim",
        "--set",
        "cpu_shares=1",
        "--live",
        "--config",
    ]);
    assert!(err.contains("cpu_shares"), "{err}");
    assert_eq!(read(&cpu.join("cpu.shares")), "300");
    let err = d.fails(&["vcpupin", "lim", "3", "0"]);
    assert!(err.contains("vcpu") && err.contains("1 vCPUs"), "{err}");
}

#[test]
fn heavy_guest_touching_more_than_memory_is_oom_killed() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    let run = |name: &str, mib: u32| {
        let cmdline = format!("probe=mem probe.mib={mib} probe.passes=1");
        d.ok(&[
            "run",
            "--name",
            name,
            "--kernel",
            &probe(),
            "--cmdline",
            &cmdline,
            "--guest-memory",
            "512m",
            "--memory",
            "128m",
        ]);
    };
    run("small", 64);
    let info = d.wait_state("small", "shut off", WAIT);
    assert_eq!(
        (info.reason.as_str(), info.exit_code),
        ("shutdown", Some(1)),
        "probe DONE ok is debug-exit 0"
    );
    let console = std::fs::read_to_string(&info.console_log).unwrap();
    assert!(console.contains("PROBE DONE ok"), "{console}");

    run("big", 256);
    let info = d.wait_state("big", "crashed", WAIT);
    assert_eq!(info.reason, "oom");
    assert!(
        !d.cgroup_dir("memory", "big", "").exists(),
        "cgroup left behind"
    );
    let out = d.ok(&["domstate", "big", "--reason"]);
    assert_eq!(out, "crashed (oom)\n");
    // The other domain was not touched.
    assert_eq!(d.info("small").reason, "shutdown");
}

#[test]
fn heavy_transient_run_is_forgotten_when_it_stops() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    let name = d.ok(&[
        "run",
        "--rm",
        "--kernel",
        &probe(),
        "--cmdline",
        "probe=mem probe.mib=8 probe.dirty_mib_s=4",
    ]);
    let name = name.trim();
    assert!(name.starts_with("vm-"), "{name}");
    let info = d.info(name);
    assert!(!info.persistent);
    assert!(!d.state_dir().join(format!("domains/{name}.toml")).exists());
    let err = d.fails(&["autostart", name]);
    assert!(err.contains("transient"), "{err}");
    d.ok(&["destroy", name]);
    assert_eq!(d.ok(&["list", "--all", "--name"]), "");
}

#[test]
fn heavy_cpu_shares_split_one_cpu_like_the_seed() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    let shares = [100u64, 200, 300, 600];
    for s in shares {
        let name = format!("s{s}");
        d.ok(&[
            "run",
            "--name",
            &name,
            "--kernel",
            &probe(),
            "--cmdline",
            "probe=cpu probe.max_prime=100000 probe.events=1000000000",
            "--cpuset-cpus",
            "0",
            "--cpu-shares",
            &s.to_string(),
        ]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let usage = |s: u64| -> u64 {
        read(
            &d.cgroup_dir("cpuacct", &format!("s{s}"), "")
                .join("cpuacct.usage"),
        )
        .parse()
        .unwrap()
    };
    let before: Vec<u64> = shares.iter().map(|s| usage(*s)).collect();
    std::thread::sleep(Duration::from_secs(3));
    let used: Vec<u64> = shares
        .iter()
        .zip(&before)
        .map(|(s, b)| usage(*s) - b)
        .collect();
    let total: u64 = used.iter().sum();
    for (s, u) in shares.iter().zip(&used) {
        let got = *u as f64 / total as f64;
        let want = *s as f64 / 1200.0;
        eprintln!(
            "cpu-shares {s}: {:.1}% of CPU 0 (ideal {:.1}%)",
            got * 100.0,
            want * 100.0
        );
        assert!(
            (got - want).abs() < 0.02,
            "cpu-shares {s}: {:.1}% of the CPU, want {:.1}% (all: {used:?})",
            got * 100.0,
            want * 100.0
        );
    }
}

/// Field `n` (1-based, as proc(5) numbers them) of a thread's stat line.
fn stat_field(pid: u32, tid: u32, n: usize) -> i64 {
    let stat = read(std::path::Path::new(&format!(
        "/proc/{pid}/task/{tid}/stat"
    )));
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(n - 3).unwrap().parse().unwrap()
}

#[test]
fn heavy_cap_add_sys_nice_makes_vcpu_threads_real_time() {
    if !prerequisites() {
        return;
    }
    let d = Daemon::start();
    let err = d.fails(&["run", "--kernel", &probe(), "--cap-add", "net_admin"]);
    assert!(
        err.contains("--cap-add") && err.contains("sys_nice"),
        "{err}"
    );
    d.ok(&[
        "run",
        "--name",
        "rt",
        "--kernel",
        &probe(),
        "--cmdline",
        "probe=mem probe.mib=8 probe.dirty_mib_s=4",
        "--vcpus",
        "2",
        "--cap-add",
        "sys_nice",
    ]);
    let info = d.info("rt");
    let pid = info.pid.unwrap();
    // proc(5): field 40 is rt_priority, 41 the policy (1 = SCHED_FIFO).
    for tid in &info.vcpu_tids {
        assert_eq!(stat_field(pid, *tid, 41), 1, "vCPU thread {tid} policy");
        assert_eq!(stat_field(pid, *tid, 40), 1, "vCPU thread {tid} priority");
    }
    assert_eq!(
        stat_field(pid, pid, 41),
        0,
        "the VMM's main thread stays normal"
    );
    assert!(d
        .ok(&["dumpconfig", "rt"])
        .contains("vcpu_sched = \"fifo:1\""));
    let rt = d.cgroup_dir("cpu", "rt", "vcpu0").join("cpu.rt_runtime_us");
    if rt.exists() {
        assert_eq!(read(&rt), "250000");
    }
    d.ok(&["destroy", "rt"]);
}
