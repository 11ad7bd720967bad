//! `oxvirt vmm` virtio devices on real KVM, driven by the probe guest's
//! virtio-drivers stack: disk data checked by `oxvirt img` and qemu-img on
//! raw, qcow2 and qcow2 over a backing file; read-only disks; throttling
//! and its run-time change; entropy; TCP and UDP over a tap inside a
//! network namespace the test creates.

mod vmm_common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use oxvirt_probe::blkpattern;
use serde_json::json;
use testkit::{probe_kernel_virtio, require, require_kvm, require_root, VmRun};
use vmm_common::{oxvirt, temp_dir, tool, vmm, Session};

const MIB: usize = 1 << 20;
const DISK_MIB: usize = 24;
const SEED: u64 = 0x0dd_5eed;

/// A raw image of `DISK_MIB` MiB: the pattern over the first `pattern_mib`
/// MiB (with `seed`), zeros after.
fn raw_image(dir: &Path, name: &str, pattern_mib: usize, seed: u64) -> PathBuf {
    let mut bytes = vec![0; DISK_MIB * MIB];
    blkpattern::fill(&mut bytes[..pattern_mib * MIB], 0, seed);
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write the test image");
    path
}

/// The probe guest with `cmdline` and `disk` (an `--disk` value).
fn boot(cmdline: &str, extra: &[&str]) -> VmRun {
    let kernel = probe_kernel_virtio();
    let mut args = vec!["--kernel", kernel.to_str().unwrap(), "--memory", "96M"];
    args.extend(["--cmdline", cmdline]);
    args.extend(extra);
    vmm(&args, Duration::from_secs(120))
}

fn assert_ok(run: &VmRun) {
    assert_eq!(run.probe.done, Some(Ok(())), "{}", run.describe());
    assert_eq!(run.exit_code(), Some(1), "{}", run.describe());
}

/// The `seconds=` of the one `PROBE RESULT blk` line.
fn blk_seconds(run: &VmRun) -> f64 {
    let result = run.probe.results_of("blk").next();
    result
        .and_then(|r| r.num("seconds"))
        .unwrap_or_else(|| panic!("no blk result\n{}", run.describe()))
}

/// `compare` by both image tools: 0 identical, 1 different.
fn compare_both(expected: &Path, image: &Path, format: &str) -> (i32, i32) {
    let run = |tool: &mut Command| {
        tool.args(["compare", "-f", "raw", "-F", format])
            .args([expected, image])
            .output()
            .expect("run compare")
            .status
            .code()
            .unwrap_or(-1)
    };
    (run(oxvirt().arg("img")), run(&mut Command::new("qemu-img")))
}

#[test]
fn heavy_vmm_blk_guest_writes_are_on_the_image_for_raw_qcow2_and_overlays() {
    if !require_kvm() {
        return;
    }
    let dir = temp_dir("vmm-blk-write");
    let base_seed = 0xba5e;
    let base = raw_image(&dir, "base.raw", DISK_MIB, base_seed);
    let raw = raw_image(&dir, "disk.raw", 0, 0);
    let qcow2 = dir.join("disk.qcow2");
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            qcow2.to_str().unwrap(),
            "24M",
        ],
    );
    let overlay = dir.join("overlay.qcow2");
    let status = oxvirt()
        .args(["img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .args([&base, &overlay])
        .status()
        .unwrap();
    assert!(status.success());

    for (image, format, cache, under) in [
        (&raw, "raw", "writeback", None),
        (&raw, "raw", "none", None),
        (&qcow2, "qcow2", "none", None),
        (&qcow2, "qcow2", "writethrough", None),
        (&overlay, "qcow2", "unsafe", Some(&base)),
    ] {
        let disk = format!("path={},format={format},cache={cache}", image.display());
        let run = boot(
            &format!("probe=blk probe.mode=seqwrite probe.mib=4 probe.bs=65536 probe.verify=1 probe.seed={SEED}"),
            &["--disk", &disk],
        );
        assert_ok(&run);
        // What the image should read as: the guest's 4 MiB over zeros or
        // over the backing file.
        let mut expected = match under {
            Some(base) => std::fs::read(base).unwrap(),
            None => vec![0; DISK_MIB * MIB],
        };
        blkpattern::fill(&mut expected[..4 * MIB], 0, SEED);
        let expected_path = dir.join("expected.raw");
        std::fs::write(&expected_path, &expected).unwrap();
        assert_eq!(
            compare_both(&expected_path, image, format),
            (0, 0),
            "{disk}"
        );
        // The comparison can fail: one flipped byte in what is expected.
        expected[3 * MIB + 17] ^= 0x20;
        std::fs::write(&expected_path, &expected).unwrap();
        assert_eq!(
            compare_both(&expected_path, image, format),
            (1, 1),
            "{disk}"
        );
    }
    let base_now = std::fs::read(&base).unwrap();
    assert_eq!(
        blkpattern::check(&base_now, 0, base_seed),
        Ok(()),
        "backing file changed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn heavy_vmm_blk_guest_verifies_what_the_host_wrote() {
    if !require_kvm() {
        return;
    }
    let dir = temp_dir("vmm-blk-read");
    let raw = raw_image(&dir, "disk.raw", 16, SEED);
    let qcow2 = dir.join("disk.qcow2");
    tool(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            qcow2.to_str().unwrap(),
        ],
    );
    for (image, format) in [(&raw, "raw"), (&qcow2, "qcow2")] {
        let disk = format!("path={},format={format},readonly=on", image.display());
        for (mode, bs) in [("seqread", MIB), ("randread", 4096)] {
            let run = boot(
                &format!("probe=blk probe.mode={mode} probe.mib=16 probe.bs={bs} probe.verify=1 probe.seed={SEED}"),
                &["--disk", &disk],
            );
            assert_ok(&run);
        }
    }
    // One flipped word: the guest names the sector.
    let mut bytes = std::fs::read(&raw).unwrap();
    bytes[2222 * blkpattern::SECTOR + 8] ^= 1;
    std::fs::write(&raw, bytes).unwrap();
    let disk = format!("path={},readonly=on", raw.display());
    let run = boot(
        &format!("probe=blk probe.mode=seqread probe.mib=16 probe.bs=131072 probe.verify=1 probe.seed={SEED}"),
        &["--disk", &disk],
    );
    match &run.probe.done {
        Some(Err(m)) => assert!(m.contains("sector 2222 offset 8"), "{m}"),
        other => panic!(
            "expected a verify failure, got {other:?}\n{}",
            run.describe()
        ),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn heavy_vmm_blk_readonly_disk_refuses_writes() {
    if !require_kvm() {
        return;
    }
    let dir = temp_dir("vmm-blk-ro");
    let raw = raw_image(&dir, "disk.raw", 2, SEED);
    let before = std::fs::read(&raw).unwrap();
    let disk = format!("path={},readonly=on", raw.display());
    let run = boot(
        "probe=blk probe.mode=seqwrite probe.mib=1 probe.seed=9",
        &["--disk", &disk],
    );
    match &run.probe.done {
        Some(Err(m)) => assert!(
            m.contains("write of 4096 bytes at sector 0 failed: I/O error"),
            "{m}"
        ),
        other => panic!("expected an I/O error, got {other:?}\n{}", run.describe()),
    }
    assert!(
        std::fs::read(&raw).unwrap() == before,
        "read-only disk changed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn heavy_vmm_blk_throttles_bytes_and_operations() {
    if !require_kvm() {
        return;
    }
    let dir = temp_dir("vmm-blk-throttle");
    let raw = raw_image(&dir, "disk.raw", 0, 0);
    // 8 MiB at write_bps=1M: 8 s within 10 %.
    let disk = format!("path={},write_bps=1M", raw.display());
    let run = boot(
        &format!("probe=blk probe.mode=seqwrite probe.mib=8 probe.bs=65536 probe.seed={SEED}"),
        &["--disk", &disk],
    );
    assert_ok(&run);
    let seconds = blk_seconds(&run);
    assert!(
        (7.2..=8.8).contains(&seconds),
        "8 MiB at 1 MiB/s took {seconds} s"
    );
    // 512 random 4 KiB writes at write_iops=200: 2.56 s within 10 %.
    let disk = format!("path={},write_iops=200", raw.display());
    let run = boot(
        &format!("probe=blk probe.mode=randwrite probe.mib=2 probe.bs=4096 probe.seed={SEED}"),
        &["--disk", &disk],
    );
    assert_ok(&run);
    let seconds = blk_seconds(&run);
    assert!(
        (2.3..=2.82).contains(&seconds),
        "512 writes at 200 IOPS took {seconds} s"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn heavy_vmm_blk_throttle_changes_at_run_time_and_stats_count() {
    if !require_kvm() {
        return;
    }
    let dir = temp_dir("vmm-blk-tune");
    let raw = raw_image(&dir, "disk.raw", 16, SEED);
    let disk = format!("path={},read_bps=1M,id=root,serial=OXSERIAL", raw.display());
    let start = Instant::now();
    // 16 MiB at 1 MiB/s would take 16 s.
    let mut s = Session::start(
        "vmm-blk-tune-session",
        &probe_kernel_virtio(),
        &[
            "--memory",
            "96M",
            "--disk",
            &disk,
            "--cmdline",
            &format!(
                "probe=blk probe.mode=seqread probe.mib=16 probe.bs=1048576 probe.seed={SEED}"
            ),
        ],
    );
    let block = s.ok("query-block", json!({}));
    let inserted = &block[0]["inserted"];
    assert_eq!(block[0]["device"], "root");
    assert_eq!(inserted["drv"], "raw");
    assert_eq!(inserted["ro"], false);
    assert_eq!(inserted["serial"], "OXSERIAL");
    assert_eq!(
        (inserted["bps"].as_u64(), inserted["bps_rd"].as_u64()),
        (Some(0), Some(1 << 20))
    );
    std::thread::sleep(Duration::from_millis(1500));
    let stats = s.ok("query-blockstats", json!({}));
    let read = stats[0]["stats"]["rd_bytes"].as_u64().unwrap();
    assert!(
        read > 0 && read < 4 << 20,
        "read {read} bytes in 1.5 s at 1 MiB/s"
    );
    let missing = s.execute_with("block_set_io_throttle", json!({"device": "nope", "bps": 0}));
    assert_eq!(missing["error"]["class"], "DeviceNotFound", "{missing}");
    let both = s.execute_with(
        "block_set_io_throttle",
        json!({"device": "root", "bps": 1, "bps_rd": 1}),
    );
    assert_eq!(both["error"]["class"], "GenericError", "{both}");
    s.ok(
        "block_set_io_throttle",
        json!({"device": "root", "bps": 0, "iops": 0}),
    );
    let block = s.ok("query-block", json!({}));
    assert_eq!(block[0]["inserted"]["bps_rd"], 0);
    s.wait_count("PROBE DONE ok", 1, Duration::from_secs(10));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the new limit did not apply at once"
    );
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn heavy_vmm_rng_reads_entropy() {
    if !require_kvm() {
        return;
    }
    let run = boot("probe=rng probe.bytes=65536", &["--rng"]);
    assert_ok(&run);
    let rng = run.probe.results_of("rng").next().expect("rng result");
    assert_eq!(rng.num("bytes"), Some(65536.0));
    assert_eq!(rng.num("distinct"), Some(256.0), "{}", run.describe());
}

#[test]
fn heavy_vmm_bad_devices_are_named_before_the_guest_runs() {
    if !require_kvm() {
        return;
    }
    let dir = temp_dir("vmm-bad-devices");
    let missing = dir.join("missing.raw");
    let text = raw_image(&dir, "disk.raw", 0, 0);
    for (flag, value, why) in [
        (
            "--disk",
            format!("path={}", missing.display()),
            "missing.raw",
        ),
        (
            "--disk",
            format!("path={},format=qcow2", text.display()),
            "disk0",
        ),
        (
            "--disk",
            format!("path={},bps=lots", text.display()),
            "bps=lots",
        ),
        (
            "--disk",
            format!("path={},colour=red", text.display()),
            "unknown option \"colour\"",
        ),
        ("--net", "tap=/x".into(), "tap= must be"),
        ("--net", "tap=oxnone0,mac=01:02".into(), "mac=01:02"),
        ("--incoming", "ftp:somewhere".into(), "unknown scheme"),
        (
            "--incoming",
            format!("file:{}", missing.display()),
            "missing.raw",
        ),
    ] {
        let run = boot("probe=hello", &[flag, &value]);
        assert_eq!(
            run.exit_code(),
            Some(1),
            "{flag} {value}: {}",
            run.describe()
        );
        assert!(run.stderr.contains(why), "{flag} {value}: {}", run.stderr);
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
        assert!(run.probe.done.is_none(), "the guest ran");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A network namespace with a tap (10.78.0.1/24) for the guest; deleted,
/// tap included, on drop.
struct TapNamespace {
    ns: host::net::NetNs,
    tap: String,
}

impl TapNamespace {
    fn create(tag: &str) -> Self {
        let suffix = std::process::id() % 100_000;
        let ns = host::net::NetNs::create(&format!("oxvirt-{tag}-{suffix}")).expect("netns");
        let tap = format!("oxvn{suffix}");
        let n = ns.name();
        tool("ip", &["-n", n, "link", "set", "lo", "up"]);
        tool(
            "ip",
            &[
                "-n", n, "tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr",
            ],
        );
        tool("ip", &["-n", n, "link", "set", &tap, "up"]);
        tool("ip", &["-n", n, "addr", "add", "10.78.0.1/24", "dev", &tap]);
        TapNamespace { ns, tap }
    }
}

impl Drop for TapNamespace {
    fn drop(&mut self) {
        let _ = self.ns.delete();
    }
}

/// Sends `data` through the guest's TCP echo server and reads it back.
fn tcp_echo(stream: TcpStream, data: &[u8]) -> Vec<u8> {
    let mut reader = stream.try_clone().unwrap();
    reader
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let sent = data.to_vec();
    let sender = std::thread::spawn(move || (&stream).write_all(&sent));
    let mut echoed = vec![0; data.len()];
    reader.read_exact(&mut echoed).expect("read the echo");
    sender.join().unwrap().expect("send to the guest");
    echoed
}

#[test]
fn heavy_vmm_net_moves_100_mib_over_a_tap_in_a_namespace() {
    if !(require_kvm()
        && require_root()
        && require(
            Path::new("/dev/net/tun").exists(),
            "/dev/net/tun is missing",
        ))
    {
        return;
    }
    let net = TapNamespace::create("vmm-net");
    let mut command = Command::new("ip");
    command.args([
        "netns",
        "exec",
        net.ns.name(),
        env!("CARGO_BIN_EXE_oxvirt"),
        "vmm",
    ]);
    command.arg("--kernel").arg(probe_kernel_virtio());
    command.args([
        "--memory",
        "96M",
        "--net",
        &format!("tap={},id=lan", net.tap),
    ]);
    command.args(["--cmdline", "probe=net probe.ip=10.78.0.2/24 probe.port=7"]);
    let mut s = Session::spawn("vmm-net", command);
    s.wait_count(
        "PROBE RESULT net listening ip=10.78.0.2/24 port=7",
        1,
        Duration::from_secs(30),
    );

    // 100 MiB of non-repeating data through TCP, then UDP datagrams.
    let data: Vec<u8> = (0..100u32 << 20)
        .map(|i| (i ^ (i >> 11) ^ (i >> 23)) as u8)
        .collect();
    // The guest serves one connection at a time and listens again after it.
    let connect = |port| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match net
                .ns
                .run(move || TcpStream::connect(("10.78.0.2", port)))
                .unwrap()
            {
                Ok(stream) => return stream,
                Err(e) if Instant::now() > deadline => panic!("connect to the guest: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    };
    let stream = connect(7);
    let start = Instant::now();
    let echoed = tcp_echo(stream, &data);
    eprintln!(
        "oxvirt net TCP echo over tap: {:.1} MB/s",
        data.len() as f64 / start.elapsed().as_secs_f64() / 1e6
    );
    assert!(echoed == data, "the TCP echo differs from what was sent");
    let udp = net
        .ns
        .run(|| UdpSocket::bind("10.78.0.1:0"))
        .unwrap()
        .unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for datagram in [&b"ping"[..], &[0xa5; 1400][..]] {
        udp.send_to(datagram, ("10.78.0.2", 7)).unwrap();
        let mut buf = [0; 2048];
        let (len, _) = udp.recv_from(&mut buf).expect("UDP echo");
        assert_eq!(&buf[..len], datagram);
    }

    let nics = s.ok("query-net", json!({}));
    assert_eq!(
        (nics[0]["name"].as_str(), nics[0]["ifname"].as_str()),
        (Some("lan"), Some(net.tap.as_str()))
    );
    assert_eq!(nics[0]["mac"], "52:54:00:12:34:56");
    let (rx, tx) = (
        nics[0]["rx_bytes"].as_u64().unwrap(),
        nics[0]["tx_bytes"].as_u64().unwrap(),
    );
    assert!(rx > 100 << 20 && tx > 100 << 20, "rx {rx} tx {tx}");

    // A 1 MiB/s limit on the guest's sending slows the echo of 2 MiB to about 2 s.
    s.ok("net_set_throttle", json!({"device": "lan", "bps": 1 << 20}));
    let small = &data[..2 << 20];
    let start = Instant::now();
    assert!(tcp_echo(connect(7), small) == small);
    let seconds = start.elapsed().as_secs_f64();
    assert!(
        (1.6..4.0).contains(&seconds),
        "2 MiB at 1 MiB/s took {seconds} s"
    );
    s.ok("net_set_throttle", json!({"device": "lan"}));

    let mut quit = connect(7);
    quit.write_all(b"quit").unwrap();
    drop(quit);
    s.wait_count("PROBE DONE ok", 1, Duration::from_secs(30));
    let console = s.console();
    assert!(console.contains("udp_datagrams=2"), "{console}");
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(1));
}

/// A host block device as the disk: sized by seeking (its metadata says 0).
#[test]
fn heavy_vmm_blk_on_a_loop_device() {
    if !(require_kvm() && require_root()) {
        return;
    }
    let dir = temp_dir("vmm-blk-loop");
    let backing = raw_image(&dir, "loop.raw", 0, 0);
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output()
        .expect("run losetup");
    assert!(out.status.success(), "losetup: {out:?}");
    let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let disk = format!("path={device},format=raw,cache=none");
    let run = boot(
        &format!("probe=blk probe.mode=seqwrite probe.mib=4 probe.bs=65536 probe.verify=1 probe.seed={SEED}"),
        &["--disk", &disk],
    );
    let _ = Command::new("losetup").args(["-d", &device]).status();
    assert_ok(&run);
    let bytes = std::fs::read(&backing).unwrap();
    assert_eq!(blkpattern::check(&bytes[..4 * MIB], 0, SEED), Ok(()));
    let _ = std::fs::remove_dir_all(&dir);
}
