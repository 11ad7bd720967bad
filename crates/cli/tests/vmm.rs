//! `oxvirt vmm` on real KVM: the probe guest's workloads, every exit-status
//! path, and bad input.

mod vmm_common;

use std::time::Duration;

use vmm_common::{probe, temp_dir, tiny_guest, vmm};

const SHORT: Duration = Duration::from_secs(30);

#[test]
fn heavy_probe_hello_exits_through_debug_exit() {
    if !testkit::require_kvm() {
        return;
    }
    let run = probe("probe=hello", 1);
    assert!(run.probe.ready, "{}", run.describe());
    assert_eq!(run.probe.done, Some(Ok(())), "{}", run.describe());
    // PROBE DONE ok writes 0 to port 0xf4: (0 << 1) | 1.
    assert_eq!(run.exit_code(), Some(1), "{}", run.describe());
    let hello = run.probe.results_of("hello").next().expect("hello result");
    assert_eq!(hello.values.get("cpu").map(String::as_str), Some("0"));
    assert_eq!(
        hello.values.get("rsdp").map(String::as_str),
        Some("0xe0000")
    );
}

#[test]
fn heavy_probe_cpu_reports_events_per_second() {
    if !testkit::require_kvm() {
        return;
    }
    let run = probe("probe=cpu probe.events=200", 1);
    assert_eq!(run.probe.done, Some(Ok(())), "{}", run.describe());
    let cpu = run.probe.results_of("cpu").next().expect("cpu result");
    assert_eq!(cpu.num("events"), Some(200.0));
    assert!(
        cpu.num("events_s").unwrap_or(0.0) > 0.0,
        "{}",
        run.describe()
    );
}

#[test]
fn heavy_probe_smp_two_vcpus_report_in() {
    if !testkit::require_kvm() {
        return;
    }
    let run = probe("probe=smp", 2);
    assert_eq!(run.probe.done, Some(Ok(())), "{}", run.describe());
    let cpus: Vec<_> = run
        .probe
        .results_of("smp")
        .filter_map(|r| r.values.get("cpu").cloned())
        .collect();
    assert_eq!(cpus, ["0", "1"], "{}", run.describe());
    let summary = run
        .probe
        .results_of("smp")
        .find(|r| r.values.contains_key("cpus"))
        .expect("smp summary");
    assert_eq!(summary.num("cpus"), Some(2.0));
    assert_eq!(
        summary.values.get("source").map(String::as_str),
        Some("madt")
    );
}

#[test]
fn heavy_probe_mem_fills_and_verifies() {
    if !testkit::require_kvm() {
        return;
    }
    let run = probe("probe=mem probe.mib=16 probe.passes=3 probe.verify=1", 1);
    assert_eq!(run.probe.done, Some(Ok(())), "{}", run.describe());
    assert!(
        run.probe.results_of("mem").count() >= 3,
        "{}",
        run.describe()
    );
}

#[test]
fn heavy_probe_failure_exits_3() {
    if !testkit::require_kvm() {
        return;
    }
    let run = probe("probe=fault", 1);
    assert!(matches!(run.probe.done, Some(Err(_))), "{}", run.describe());
    assert_eq!(run.exit_code(), Some(3), "{}", run.describe());
}

fn tiny(action: &str) -> testkit::VmRun {
    vmm(
        &[
            "--kernel",
            tiny_guest().to_str().unwrap(),
            "--cmdline",
            action,
            "--memory",
            "16M",
        ],
        SHORT,
    )
}

#[test]
fn heavy_guest_power_off_exits_0() {
    if !testkit::require_kvm() {
        return;
    }
    let run = tiny("p");
    assert!(run.console.starts_with("T\n"), "{}", run.describe());
    assert_eq!(run.exit_code(), Some(0), "{}", run.describe());
}

#[test]
fn heavy_guest_reset_requests_exit_0_like_qemu_no_reboot() {
    if !testkit::require_kvm() {
        return;
    }
    for action in ["k", "t"] {
        let run = tiny(action);
        // One boot only: the VMM exits instead of rebooting the guest.
        assert_eq!(run.console, "T\n", "{action}: {}", run.describe());
        assert_eq!(run.exit_code(), Some(0), "{action}: {}", run.describe());
    }
}

#[test]
fn heavy_debug_exit_value_becomes_the_status() {
    if !testkit::require_kvm() {
        return;
    }
    let run = tiny("d5");
    assert_eq!(run.exit_code(), Some(11), "{}", run.describe());
}

#[test]
fn heavy_config_file_toml_and_json() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = temp_dir("vmm-config");
    let kernel = testkit::probe_kernel();
    let toml = dir.join("vm.toml");
    std::fs::write(
        &toml,
        format!(
            "kernel = {:?}\ncmdline = \"probe=smp\"\nmemory = \"64M\"\nvcpus = 2\n",
            kernel
        ),
    )
    .unwrap();
    let run = vmm(
        &["--config", toml.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(run.probe.done, Some(Ok(())), "{}", run.describe());
    assert_eq!(
        run.probe
            .results_of("smp")
            .filter(|r| r.values.contains_key("cpu"))
            .count(),
        2
    );
    let json = dir.join("vm.json");
    std::fs::write(
        &json,
        serde_json::json!({"kernel": kernel, "cmdline": "probe=hello", "memory": 32}).to_string(),
    )
    .unwrap();
    // Flags override the file.
    let run = vmm(
        &[
            "--config",
            json.to_str().unwrap(),
            "--cmdline",
            "probe=fault",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(run.exit_code(), Some(3), "{}", run.describe());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn heavy_serial_to_file() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = temp_dir("vmm-serial");
    let out = dir.join("console.txt");
    let kernel = testkit::probe_kernel();
    let target = format!("file:{}", out.display());
    let run = vmm(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "probe=hello",
            "--serial",
            &target,
        ],
        SHORT,
    );
    assert_eq!(run.exit_code(), Some(1), "{}", run.describe());
    assert!(run.console.is_empty(), "{}", run.describe());
    let console = std::fs::read_to_string(&out).unwrap();
    assert!(console.contains("PROBE DONE ok"), "{console}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `oxvirt vmm ARGS` expecting a one-line error containing `needle`.
fn expect_error(args: &[&str], needle: &str) {
    let run = vmm(args, SHORT);
    let code = run.exit_code();
    assert!(
        code.is_some() && code != Some(0),
        "{args:?}: {}",
        run.describe()
    );
    let stderr = run.stderr.trim_end();
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {}", run.describe());
    assert!(
        stderr.contains(needle),
        "{args:?}: want {needle:?}\n{}",
        run.describe()
    );
    assert!(!stderr.contains("panicked"), "{}", run.describe());
}

#[test]
fn heavy_bad_input_gives_one_line_errors() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = temp_dir("vmm-bad");
    let probe = testkit::probe_kernel();
    let probe = probe.to_str().unwrap();
    let missing = dir.join("nope");
    expect_error(&["--kernel", missing.to_str().unwrap()], "No such file");
    let text = dir.join("text");
    std::fs::write(&text, "just some text, not a kernel\n").unwrap();
    expect_error(
        &["--kernel", text.to_str().unwrap()],
        "not an ELF file or a bzImage",
    );
    // An ELF without the PVH note: the test binary's own helper, `as`'s object.
    let no_note = dir.join("plain.elf");
    std::fs::copy("/bin/true", &no_note).unwrap();
    expect_error(
        &["--kernel", no_note.to_str().unwrap()],
        "no PVH entry note",
    );
    expect_error(&["--kernel", probe, "--memory", "1M"], "at least");
    expect_error(
        &["--kernel", probe, "--memory", "100T"],
        "more than this host's RAM",
    );
    expect_error(&["--kernel", probe, "--memory", "lots"], "expected a size");
    expect_error(&["--kernel", probe, "--vcpus", "100000"], "at most");
    expect_error(&["--kernel", probe, "--vcpus", "0"], "at least one vCPU");
    expect_error(
        &["--kernel", probe, "--initrd", missing.to_str().unwrap()],
        "initrd",
    );
    expect_error(&["--kernel", probe, "--serial", "tcp:1"], "expected stdio");
    expect_error(&["--kernel", probe, "--cpu-profile", "fast"], "pvm-compat");
    let bad_cfg = dir.join("bad.toml");
    std::fs::write(&bad_cfg, "kernel = \"/k\"\nvcpu = 2\n").unwrap();
    expect_error(&["--config", bad_cfg.to_str().unwrap()], "bad.toml");
    expect_error(&[], "no kernel");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn heavy_bad_bzimages_are_rejected() {
    if !testkit::require_kvm() {
        return;
    }
    let dir = temp_dir("vmm-bz");
    // A bzImage header with boot protocol 2.06 (no 64-bit entry).
    let mut old = vec![0u8; 8192];
    old[0x1f1] = 4; // setup_sects
    old[0x202..0x206].copy_from_slice(b"HdrS");
    old[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
    let old_path = dir.join("old.bzImage");
    std::fs::write(&old_path, &old).unwrap();
    expect_error(&["--kernel", old_path.to_str().unwrap()], "older than 2.12");
    // A modern header that promises more than the file holds.
    let mut cut = old.clone();
    cut[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    cut[0x211] = 1; // loadflags: LOADED_HIGH
    cut[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // XLF_KERNEL_64
    cut[0x1f4..0x1f8].copy_from_slice(&0x10000u32.to_le_bytes()); // syssize: 1 MiB
    let cut_path = dir.join("cut.bzImage");
    std::fs::write(&cut_path, &cut).unwrap();
    expect_error(&["--kernel", cut_path.to_str().unwrap()], "truncated");
    std::fs::remove_dir_all(&dir).unwrap();
}
