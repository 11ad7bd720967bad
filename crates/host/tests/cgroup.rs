//! Real cgroups on this host (root only). Every test works under a parent
//! group of its own, below this process's cgroup, and a guard kills what it
//! started and removes every group even when an assertion fails.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use host::cgroup::{
    CgroupError, CgroupVersion, CpuList, DeviceNumber, DomainCgroup, Layout, MemoryLimits,
    ParentGroup, Scope, ThrottleKind,
};
use host::size::{parse_bytes, parse_cpus, MemorySwap};

/// Creates domains under a unique parent and removes everything on drop.
struct Sandbox {
    layout: Layout,
    parent: ParentGroup,
    domains: Vec<DomainCgroup>,
    children: Vec<Child>,
}

impl Sandbox {
    fn new() -> Option<Self> {
        if !testkit::require_root() {
            return None;
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let layout = Layout::detect().expect("detect cgroups");
        let name = format!("oxvirt-test-{}-{n}", std::process::id());
        let parent = ParentGroup::placed_for(&layout, name);
        Some(Sandbox {
            layout,
            parent,
            domains: Vec::new(),
            children: Vec::new(),
        })
    }

    fn domain(&mut self, name: &str, vcpus: u32) -> DomainCgroup {
        let d = DomainCgroup::create(&self.layout, &self.parent, name, vcpus).expect("create");
        self.domains.push(d.clone());
        d
    }

    /// Starts `sh -c script` held at a gate until [`release`] is called, so
    /// it can be put into a cgroup before it does anything.
    fn gated(&mut self, script: &str) -> u32 {
        let child = Command::new("sh")
            .args(["-c", &format!("read _gate; {script}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    fn child(&mut self, pid: u32) -> &mut Child {
        self.children
            .iter_mut()
            .find(|c| c.id() == pid)
            .expect("known child")
    }

    fn release(&mut self, pid: u32) {
        let stdin = self.child(pid).stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("open the gate");
    }

    /// Waits for the child and returns (exit status, stdout + stderr).
    fn finish(&mut self, pid: u32) -> (std::process::ExitStatus, String) {
        let index = self
            .children
            .iter()
            .position(|c| c.id() == pid)
            .expect("known child");
        let child = self.children.remove(index);
        let out = child.wait_with_output().expect("wait");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status, text)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for d in &self.domains {
            if let Err(e) = d.destroy() {
                eprintln!("cleanup: {e}");
            }
        }
        if let Err(e) = self.parent.remove_if_empty(&self.layout) {
            eprintln!("cleanup: {e}");
        }
    }
}

fn cgroup_lines(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/PID/cgroup")
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        .expect("status field")
}

/// The path of the first whole-disk block device the kernel lists.
fn some_block_device() -> Option<DeviceNumber> {
    let partitions = std::fs::read_to_string("/proc/partitions").ok()?;
    partitions.lines().skip(2).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let dev: DeviceNumber = format!("{}:{}", f.first()?, f.get(1)?).parse().ok()?;
        Path::new(&format!("/sys/dev/block/{dev}/device"))
            .exists()
            .then_some(dev)
    })
}

#[test]
fn detects_this_hosts_hierarchy() {
    let Some(sb) = Sandbox::new() else { return };
    let version = sb.layout.version();
    // Whatever the host is, the detected mounts must be real cgroup folders.
    for m in &sb.layout.v1 {
        assert!(m.mount_point.join("cgroup.procs").exists(), "{m:?}");
    }
    if let Some(m) = &sb.layout.v2 {
        assert!(m.mount_point.join("cgroup.controllers").exists(), "{m:?}");
    }
    if Path::new("/sys/fs/cgroup/cpu/cpu.shares").exists()
        && Path::new("/sys/fs/cgroup/unified").exists()
    {
        assert_eq!(version, CgroupVersion::Hybrid);
    }
}

#[test]
fn creates_sets_reads_back_and_removes() {
    let Some(mut sb) = Sandbox::new() else { return };
    let d = sb.domain("limits", 2);
    for path in d.paths() {
        assert!(path.is_dir(), "{}", path.display());
    }
    let cpu = sb
        .layout
        .v1_mount(host::cgroup::Controller::Cpu)
        .map(|m| m.mount_point.clone());
    if cpu.is_some() {
        let dir = d.paths()[0].to_owned();
        for child in ["emulator", "vcpu0", "vcpu1"] {
            assert!(dir.join(child).is_dir(), "{child} in {}", dir.display());
        }
    }

    d.set_cpu_shares(Scope::Domain, 512).unwrap();
    d.set_cpu_quota(Scope::Vcpu(0), Some(parse_cpus("0.5").unwrap()))
        .unwrap();
    d.set_cpuset_cpus(Scope::Vcpu(1), &"0".parse().unwrap())
        .unwrap();
    let dom = d.cpu_limits(Scope::Domain).unwrap();
    assert_eq!((dom.shares, dom.quota_us), (512, None));
    let v0 = d.cpu_limits(Scope::Vcpu(0)).unwrap();
    assert_eq!((v0.quota_us, v0.period_us), (Some(50_000), 100_000));
    assert_eq!(d.cpu_limits(Scope::Vcpu(1)).unwrap().cpus.to_string(), "0");
    d.set_cpu_quota(Scope::Vcpu(0), None).unwrap();
    assert_eq!(d.cpu_limits(Scope::Vcpu(0)).unwrap().quota_us, None);

    let mem = parse_bytes("64m").unwrap();
    let limits = MemoryLimits {
        limit: Some(mem),
        soft: Some(parse_bytes("32m").unwrap()),
        swap: MemorySwap::Unset,
    };
    d.set_memory(&limits).unwrap();
    let back = d.memory_limits().unwrap();
    assert_eq!((back.limit, back.soft), (Some(mem), Some(32 << 20)));
    if back.swap != MemorySwap::Unset {
        assert_eq!(
            back.swap,
            MemorySwap::Limit(2 * mem),
            "Docker: unset means twice the memory"
        );
    }
    // Lowering then raising both limits must work in either order.
    d.set_memory(&MemoryLimits {
        limit: Some(16 << 20),
        soft: None,
        swap: MemorySwap::Limit(16 << 20),
    })
    .unwrap();
    d.set_memory(&MemoryLimits {
        limit: Some(1 << 30),
        soft: None,
        swap: MemorySwap::Unlimited,
    })
    .unwrap();
    let back = d.memory_limits().unwrap();
    assert_eq!((back.limit, back.soft), (Some(1 << 30), None));
    assert!(
        matches!(back.swap, MemorySwap::Unlimited | MemorySwap::Unset),
        "{back:?}"
    );

    d.set_pids_limit(Some(50)).unwrap();
    assert_eq!(d.pids_limit().unwrap(), Some(50));
    d.set_pids_limit(None).unwrap();
    assert_eq!(d.pids_limit().unwrap(), None);

    if let Some(dev) = some_block_device() {
        d.set_throttle(dev, ThrottleKind::WriteBps, Some(1 << 20))
            .unwrap();
        d.set_throttle(dev, ThrottleKind::ReadIops, Some(100))
            .unwrap();
        let io = d.io_limits().unwrap();
        let got: Vec<_> = io
            .throttles
            .iter()
            .map(|t| (t.device, t.kind, t.limit))
            .collect();
        assert_eq!(
            got,
            vec![
                (dev, ThrottleKind::WriteBps, 1 << 20),
                (dev, ThrottleKind::ReadIops, 100)
            ]
        );
        d.set_throttle(dev, ThrottleKind::WriteBps, None).unwrap();
        d.set_throttle(dev, ThrottleKind::ReadIops, None).unwrap();
        assert!(d.io_limits().unwrap().throttles.is_empty());
    } else {
        eprintln!("no block device found: throttles not exercised");
    }

    let paths: Vec<_> = d.paths().into_iter().map(Path::to_owned).collect();
    d.remove().unwrap();
    for path in paths {
        assert!(!path.exists(), "{} left behind", path.display());
    }
}

#[test]
fn blkio_weight_is_set_or_refused_clearly() {
    let Some(mut sb) = Sandbox::new() else { return };
    let d = sb.domain("weight", 1);
    match d.set_blkio_weight(300) {
        Ok(()) => assert_eq!(d.io_limits().unwrap().weight, Some(300)),
        Err(CgroupError::Unsupported { detail, .. }) => {
            assert!(detail.contains("blkio.weight"), "{detail}");
            assert_eq!(d.io_limits().unwrap().weight, None);
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
    assert!(d.set_blkio_weight(5).is_err());
}

#[test]
fn attaches_processes_and_threads_and_refuses_to_remove_a_busy_group() {
    let Some(mut sb) = Sandbox::new() else { return };
    let d = sb.domain("attach", 1);
    let pid = sb.gated("sleep 30");
    d.attach_process(pid).unwrap();
    let lines = cgroup_lines(pid);
    for path in d.paths() {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(lines.contains(&format!("/{name}")), "{lines}");
    }
    assert!(lines.contains("/attach/emulator"), "{lines}");
    d.attach_thread(Scope::Vcpu(0), pid).unwrap();
    let lines = cgroup_lines(pid);
    assert!(lines.contains("/attach/vcpu0"), "{lines}");
    assert!(!lines.contains("/attach/emulator"), "{lines}");
    assert_eq!(d.tasks().unwrap(), vec![pid]);
    if let Some(v2) = d.paths().iter().find(|p| p.join("cgroup.threads").exists()) {
        let kind = std::fs::read_to_string(v2.join("vcpu0/cgroup.type")).unwrap();
        assert_eq!(kind.trim(), "threaded");
        assert!(
            lines
                .lines()
                .any(|l| l.starts_with("0::") && l.ends_with("/attach/vcpu0")),
            "{lines}"
        );
    }

    let err = d.remove().unwrap_err();
    assert!(matches!(err, CgroupError::NotEmpty { .. }), "{err}");
    assert!(err.to_string().contains("attach"), "{err}");
    assert!(err.to_string().contains(&pid.to_string()), "{err}");
    assert!(d.paths().iter().all(|p| p.exists()));

    d.destroy().unwrap();
    let (status, _) = sb.finish(pid);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9));
    assert!(d.paths().iter().all(|p| !p.exists()));
}

#[test]
fn cpuset_pins_a_process_and_vcpu_pins_survive_domain_changes() {
    let Some(mut sb) = Sandbox::new() else { return };
    let online: CpuList = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .unwrap()
        .parse()
        .unwrap();
    let last = online.iter().last().unwrap();
    let d = sb.domain("pin", 1);
    let pid = sb.gated("sleep 30");
    d.attach_process(pid).unwrap();
    let only_last: CpuList = [last].into_iter().collect();
    d.set_cpuset_cpus(Scope::Domain, &only_last).unwrap();
    assert_eq!(status_field(pid, "Cpus_allowed_list:"), last.to_string());
    assert_eq!(d.cpu_limits(Scope::Emulator).unwrap().cpus, only_last);

    d.set_cpuset_cpus(Scope::Domain, &online).unwrap();
    d.attach_thread(Scope::Vcpu(0), pid).unwrap();
    d.set_cpuset_cpus(Scope::Vcpu(0), &"0".parse().unwrap())
        .unwrap();
    assert_eq!(status_field(pid, "Cpus_allowed_list:"), "0");
    d.set_cpuset_mems(Scope::Domain, &"0".parse().unwrap())
        .unwrap();
    assert_eq!(d.cpu_limits(Scope::Domain).unwrap().mems.to_string(), "0");
    assert!(d
        .set_cpuset_cpus(Scope::Domain, &CpuList::default())
        .is_err());
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let Some(mut sb) = Sandbox::new() else { return };
    let d = sb.domain("bad", 1);
    let exists = DomainCgroup::create(&sb.layout, &sb.parent, "bad", 1).unwrap_err();
    assert!(matches!(exists, CgroupError::Exists { .. }), "{exists}");
    assert!(
        d.paths().iter().all(|p| p.exists()),
        "a refused create must not touch the existing group"
    );
    let missing = DomainCgroup::open(&sb.layout, &sb.parent, "nosuch", 1).unwrap_err();
    assert!(missing.to_string().contains("nosuch"), "{missing}");
    let reopened = DomainCgroup::open(&sb.layout, &sb.parent, "bad", 1).unwrap();
    assert_eq!(reopened.paths(), d.paths());

    let e = d.set_cpu_shares(Scope::Domain, 1).unwrap_err();
    assert!(e.to_string().contains("cpu shares"), "{e}");
    let e = d.set_cpu_shares(Scope::Vcpu(3), 100).unwrap_err();
    assert!(matches!(e, CgroupError::NoSuchVcpu { index: 3, .. }), "{e}");
    let e = d
        .set_memory(&MemoryLimits {
            limit: Some(64 << 20),
            soft: None,
            swap: MemorySwap::Limit(32 << 20),
        })
        .unwrap_err();
    assert!(e.to_string().contains("at least the memory limit"), "{e}");
    let e = d
        .set_memory(&MemoryLimits {
            limit: Some(1 << 20),
            ..Default::default()
        })
        .unwrap_err();
    assert!(e.to_string().contains("6 MiB"), "{e}");
    let e = DomainCgroup::create(&sb.layout, &sb.parent, "a/b", 1).unwrap_err();
    assert!(matches!(e, CgroupError::BadName { .. }), "{e}");
    let e = d.set_pids_limit(Some(0)).unwrap_err();
    assert!(e.to_string().contains("pids"), "{e}");
}

#[test]
fn pids_limit_stops_forks() {
    let Some(mut sb) = Sandbox::new() else { return };
    let d = sb.domain("pids", 1);
    let pid = sb.gated("/bin/true && echo forked");
    d.attach_process(pid).unwrap();
    d.set_pids_limit(Some(1)).unwrap();
    sb.release(pid);
    let (status, out) = sb.finish(pid);
    assert!(!out.contains("forked"), "{out}");
    assert!(!status.success() || out.contains("fork"), "{status} {out}");
}

#[test]
fn heavy_memory_limit_oom_kills_and_is_counted() {
    let Some(mut sb) = Sandbox::new() else { return };
    let d = sb.domain("oom", 1);
    let limits = MemoryLimits {
        limit: Some(32 << 20),
        soft: None,
        swap: MemorySwap::Limit(32 << 20),
    };
    d.set_memory(&limits).unwrap();

    // dd's buffer is touched by every read: 8 MiB fits, 96 MiB does not.
    let small = sb.gated("exec dd if=/dev/zero of=/dev/null bs=8M count=4 status=none");
    d.attach_process(small).unwrap();
    sb.release(small);
    let (status, out) = sb.finish(small);
    assert!(status.success(), "{status} {out}");
    assert_eq!(d.stats().unwrap().oom_kills.unwrap_or(0), 0);

    let big = sb.gated("exec dd if=/dev/zero of=/dev/null bs=96M count=1 status=none");
    d.attach_process(big).unwrap();
    sb.release(big);
    let (status, _) = sb.finish(big);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{status}");
    let stats = d.stats().unwrap();
    assert!(stats.oom_kills.is_some_and(|n| n >= 1), "{stats:?}");
}

/// Runs a busy loop in each domain, all pinned to one CPU, for `secs`;
/// returns each domain's CPU time in that window.
fn busy_race(sb: &mut Sandbox, domains: &[DomainCgroup], secs: f64) -> Vec<f64> {
    let pids: Vec<u32> = domains
        .iter()
        .map(|d| {
            let pid = sb.gated("while :; do :; done");
            d.attach_process(pid).unwrap();
            pid
        })
        .collect();
    let before: Vec<u64> = domains
        .iter()
        .map(|d| d.cpu_usage_ns(Scope::Domain).unwrap())
        .collect();
    for &pid in &pids {
        sb.release(pid);
    }
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let used: Vec<f64> = domains
        .iter()
        .zip(before)
        .map(|(d, b)| (d.cpu_usage_ns(Scope::Domain).unwrap() - b) as f64 / 1e9)
        .collect();
    eprintln!(
        "cpu seconds {used:?} in {:.2}s",
        start.elapsed().as_secs_f64()
    );
    used
}

#[test]
fn heavy_cpu_shares_split_one_cpu_1_to_3() {
    let Some(mut sb) = Sandbox::new() else { return };
    let low = sb.domain("shares100", 1);
    let high = sb.domain("shares300", 1);
    for (d, shares) in [(&low, 100), (&high, 300)] {
        d.set_cpuset_cpus(Scope::Domain, &"0".parse().unwrap())
            .unwrap();
        d.set_cpu_shares(Scope::Domain, shares).unwrap();
    }
    let used = busy_race(&mut sb, &[low, high], 2.0);
    let ratio = used[1] / used[0];
    assert!(
        (2.2..4.0).contains(&ratio),
        "300:100 shares gave {used:?} (ratio {ratio:.2})"
    );
}

#[test]
fn heavy_cpu_quota_holds_a_busy_process() {
    let Some(mut sb) = Sandbox::new() else { return };
    let d = sb.domain("quota", 1);
    d.set_cpu_quota(Scope::Domain, Some(parse_cpus("0.2").unwrap()))
        .unwrap();
    let used = busy_race(&mut sb, &[d], 1.5);
    let share = used[0] / 1.5;
    assert!(
        (0.15..0.25).contains(&share),
        "--cpus 0.2 gave {share:.3} of a CPU"
    );
}

/// Set in the copy of this test binary that plays a multi-threaded VMM.
const THREADS_HELPER: &str = "OXVIRT_HOST_THREADS_HELPER";

/// As the helper: starts a spinning "vCPU 0" and a sleeping "vCPU 1"
/// thread, prints its own (an "emulator" thread), vCPU 0 and vCPU 1
/// thread ids, waits for EOF.
fn play_a_vmm() {
    let tid = || nix::unistd::gettid().as_raw();
    // One channel per thread: the spinner is always reported first (vcpu0),
    // whichever thread happens to start first.
    let (spin_tx, spin_rx) = std::sync::mpsc::channel();
    let (sleep_tx, sleep_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        spin_tx.send(tid()).unwrap();
        loop {
            std::hint::spin_loop();
        }
    });
    std::thread::spawn(move || {
        sleep_tx.send(tid()).unwrap();
        std::thread::sleep(Duration::from_secs(60));
    });
    let (spinner, sleeper) = (spin_rx.recv().unwrap(), sleep_rx.recv().unwrap());
    println!("TIDS {} {spinner} {sleeper}", tid());
    let mut rest = String::new();
    let _ = std::io::stdin().read_line(&mut rest);
    std::process::exit(0);
}

fn thread_cgroups(pid: u32, tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup")).expect("thread cgroup")
}

#[test]
fn heavy_vcpu_threads_get_their_own_groups() {
    if std::env::var_os(THREADS_HELPER).is_some() {
        return play_a_vmm();
    }
    let Some(mut sb) = Sandbox::new() else { return };
    let d = sb.domain("threads", 2);
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "heavy_vcpu_threads_get_their_own_groups",
            "--nocapture",
        ])
        .env(THREADS_HELPER, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the helper");
    let pid = child.id();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    sb.children.push(child);
    let mut line = String::new();
    use std::io::BufRead;
    while !line.starts_with("TIDS ") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "helper exited early");
    }
    let tids: Vec<u32> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().unwrap())
        .collect();
    let (main, vcpu0, vcpu1) = (tids[0], tids[1], tids[2]);

    d.attach_process(pid).unwrap();
    for tid in [main, vcpu0, vcpu1] {
        assert!(
            thread_cgroups(pid, tid).contains("/threads/emulator\n"),
            "{tid}"
        );
    }
    d.attach_thread(Scope::Vcpu(0), vcpu0).unwrap();
    d.attach_thread(Scope::Vcpu(1), vcpu1).unwrap();
    assert!(thread_cgroups(pid, vcpu0).contains("/threads/vcpu0\n"));
    assert!(thread_cgroups(pid, vcpu1).contains("/threads/vcpu1\n"));
    assert!(thread_cgroups(pid, main).contains("/threads/emulator\n"));

    // Pin each vCPU thread on its own; the kernel applies it per thread.
    d.set_cpuset_cpus(Scope::Vcpu(0), &"0".parse().unwrap())
        .unwrap();
    let task_status = |tid: u32| {
        let s = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
        s.lines()
            .find_map(|l| {
                l.strip_prefix("Cpus_allowed_list:")
                    .map(|v| v.trim().to_owned())
            })
            .unwrap()
    };
    assert_eq!(task_status(vcpu0), "0");
    assert_eq!(task_status(vcpu1), task_status(main), "vcpu1 unpinned");

    // CPU time is accounted per vCPU group: only vcpu0 spins.
    std::thread::sleep(Duration::from_millis(300));
    let spun = d.cpu_usage_ns(Scope::Vcpu(0)).unwrap();
    let slept = d.cpu_usage_ns(Scope::Vcpu(1)).unwrap();
    assert!(
        spun > 20_000_000 && slept < spun / 10,
        "vcpu0 {spun} ns, vcpu1 {slept} ns"
    );
    assert!(d.cpu_usage_ns(Scope::Domain).unwrap() >= spun);
}
