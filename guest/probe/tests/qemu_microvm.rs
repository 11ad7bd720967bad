//! The probe guest on the peer VMM, QEMU 7.2 `-M microvm` with KVM: every
//! workload, the protocol lines and every exit-status path. The same guest
//! must pass on oxvirt (crates/vmm's tests), so it is not tuned to either.

use std::time::Duration;

use testkit::{probe_kernel, require_kvm, require_qemu, run_vm, Microvm, VmRun};

/// QEMU's exit status for a guest that wrote `code` to port 0xf4.
fn debug_exit_status(code: i32) -> i32 {
    (code << 1) | 1
}

fn prerequisites() -> bool {
    require_kvm() && require_qemu()
}

fn boot(cmdline: &str, vcpus: u32) -> VmRun {
    boot_for(cmdline, vcpus, Duration::from_secs(60))
}

fn boot_for(cmdline: &str, vcpus: u32, timeout: Duration) -> VmRun {
    let vm = Microvm::new(probe_kernel())
        .cmdline(cmdline)
        .memory_mib(64)
        .vcpus(vcpus);
    run_vm(vm.command(), timeout)
}

/// The run ended through the debug-exit port with `PROBE DONE ok`.
fn assert_ok(run: &VmRun) {
    assert!(run.probe.ready, "no PROBE READY\n{}", run.describe());
    assert_eq!(run.probe.done, Some(Ok(())), "{}", run.describe());
    assert_eq!(
        run.exit_code(),
        Some(debug_exit_status(0)),
        "{}",
        run.describe()
    );
}

/// The run ended with `PROBE DONE fail: ...` containing `why`, exit status 3.
fn assert_fails_with(run: &VmRun, why: &str) {
    match &run.probe.done {
        Some(Err(message)) => assert!(
            message.contains(why),
            "failure {message:?} does not mention {why:?}\n{}",
            run.describe()
        ),
        other => panic!("expected a failure, got {other:?}\n{}", run.describe()),
    }
    assert_eq!(
        run.exit_code(),
        Some(debug_exit_status(1)),
        "{}",
        run.describe()
    );
}

#[test]
fn heavy_qemu_hello() {
    if !prerequisites() {
        return;
    }
    let run = boot("console=ttyS0 probe=hello", 1);
    assert_ok(&run);
    let hello: Vec<_> = run.probe.results_of("hello").collect();
    assert_eq!(hello.len(), 1, "{}", run.describe());
    assert_eq!(hello[0].num("cpu"), Some(0.0));
    // 64 MiB of guest RAM, less what the firmware keeps.
    let ram = hello[0].num("ram_mib").expect("ram_mib");
    assert!((60.0..=64.0).contains(&ram), "ram_mib={ram}");
    eprintln!("qemu microvm hello: {:?} wall", run.wall);
}

#[test]
fn heavy_qemu_cpu_reports_events_per_second() {
    if !prerequisites() {
        return;
    }
    let run = boot("probe=cpu probe.events=200 probe.max_prime=10000", 1);
    assert_ok(&run);
    let cpu = run.probe.results_of("cpu").next().expect("a cpu result");
    // sysbench counts from 3: the 1229 primes below 10000, less 2.
    assert_eq!(cpu.num("primes"), Some(1228.0), "{}", run.describe());
    assert_eq!(cpu.num("events"), Some(200.0));
    let events_s = cpu.num("events_s").expect("events_s");
    assert!(events_s > 0.0, "events_s={events_s}");
    assert!(cpu.num("tsc_khz").is_some_and(|khz| khz > 100_000.0));
    eprintln!(
        "qemu microvm cpu: events_s={events_s} tsc_khz={:?} source={:?}",
        cpu.num("tsc_khz"),
        cpu.values.get("tsc_source")
    );
}

#[test]
fn heavy_qemu_smp_every_vcpu_reports_in() {
    if !prerequisites() {
        return;
    }
    let run = boot("probe=smp", 2);
    assert_ok(&run);
    let mut cpus: Vec<f64> = run
        .probe
        .results_of("smp")
        .filter_map(|r| r.num("cpu"))
        .collect();
    cpus.sort_by(f64::total_cmp);
    assert_eq!(cpus, [0.0, 1.0], "{}", run.describe());
    let total = run
        .probe
        .results_of("smp")
        .find_map(|r| r.num("cpus"))
        .expect("a total line");
    assert_eq!(total, 2.0);

    // One vCPU: no AP to start, the total is 1.
    let run = boot("probe=smp", 1);
    assert_ok(&run);
    assert_eq!(
        run.probe.results_of("smp").find_map(|r| r.num("cpus")),
        Some(1.0),
        "{}",
        run.describe()
    );
}

#[test]
fn heavy_qemu_mem_passes_verify() {
    if !prerequisites() {
        return;
    }
    let run = boot("probe=mem probe.mib=16 probe.passes=3 probe.verify=1", 1);
    assert_ok(&run);
    let results: Vec<_> = run.probe.results_of("mem").collect();
    assert_eq!(results[0].num("fill_mib"), Some(16.0), "{}", run.describe());
    let passes: Vec<_> = results.iter().filter_map(|r| r.num("pass")).collect();
    assert_eq!(passes, [1.0, 2.0, 3.0], "{}", run.describe());
    for pass in results.iter().filter(|r| r.values.contains_key("pass")) {
        assert_eq!(pass.num("pages"), Some(16.0 * 256.0));
        assert_eq!(pass.values.get("verify").map(String::as_str), Some("ok"));
    }
}

#[test]
fn heavy_qemu_mem_dirty_rate_is_capped() {
    if !prerequisites() {
        return;
    }
    // 8 MiB per pass at 16 MiB/s: half a second per pass.
    let run = boot(
        "probe=mem probe.mib=8 probe.dirty_mib_s=16 probe.passes=2",
        1,
    );
    assert_ok(&run);
    for pass in run
        .probe
        .results_of("mem")
        .filter(|r| r.values.contains_key("pass"))
    {
        let seconds = pass.num("seconds").expect("seconds");
        assert!(
            (0.45..0.75).contains(&seconds),
            "pass took {seconds} s, expected about 0.5 s\n{}",
            run.describe()
        );
    }
    assert!(run.wall >= Duration::from_millis(900), "{:?}", run.wall);
}

#[test]
fn heavy_qemu_mem_runs_until_stopped() {
    if !prerequisites() {
        return;
    }
    // Without probe.passes the guest dirties memory until the VM is
    // killed: 8 MiB at 64 MiB/s is a pass every 125 ms.
    let run = boot_for(
        "probe=mem probe.mib=8 probe.dirty_mib_s=64 probe.verify=1",
        1,
        Duration::from_secs(2),
    );
    assert!(
        run.status.is_none(),
        "the guest stopped by itself\n{}",
        run.describe()
    );
    assert_eq!(run.probe.done, None, "{}", run.describe());
    let passes = run
        .probe
        .results_of("mem")
        .filter(|r| r.values.contains_key("pass"))
        .count();
    assert!(
        passes >= 5,
        "only {passes} passes in 2 s\n{}",
        run.describe()
    );
}

#[test]
fn heavy_qemu_failures_exit_with_status_3() {
    if !prerequisites() {
        return;
    }
    let cases = [
        ("probe=nonesuch", "unknown workload probe=nonesuch"),
        ("console=ttyS0", "no probe=<workload>"),
        ("probe=cpu probe.max_prime=ten", "probe.max_prime=ten"),
        ("probe=cpu probe.evnets=5", "unknown parameter probe.evnets"),
        ("probe=mem probe.mib=0", "probe.mib=0 is out of range"),
        ("probe=mem probe.mib=1024", "probe.mib=1024 does not fit"),
        ("probe=fault", "CPU exception 6 (#UD invalid opcode)"),
    ];
    for (cmdline, why) in cases {
        let run = boot(cmdline, 1);
        assert!(run.probe.ready, "{cmdline}: {}", run.describe());
        assert_fails_with(&run, why);
    }
}
