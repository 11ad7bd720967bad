//! The probe's virtio workloads (`blk`, `rng`) on QEMU 7.2 `-M microvm`
//! virtio-mmio devices (virtio 1.x): data written by the guest is checked
//! on the host file, by this test and by `qemu-img compare`; data written by
//! the host is checked by the guest; a read-only disk refuses writes; the
//! `net` echo servers answer over QEMU's user-mode network (loopback only).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use oxvirt_probe::blkpattern::{self, SECTOR};
use testkit::{free_port, probe_kernel_virtio, require_kvm, require_qemu, run_vm, Microvm, VmRun};

const MIB: usize = 1 << 20;
/// The disks are larger than what the guest touches, so a write past its
/// range would show.
const DISK_MIB: usize = 24;
const SEED: u64 = 0x5eed_0123_4567;

/// A scratch folder removed when dropped. (Not the `tempfile` crate: its
/// `bitflags/std` would be unified into the freestanding guest's build.)
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("oxvirt-probe-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create the scratch folder");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn prerequisites() -> bool {
    require_kvm() && require_qemu()
}

fn boot(vm: Microvm) -> VmRun {
    run_vm(vm.memory_mib(96).command(), Duration::from_secs(120))
}

fn vm(cmdline: &str) -> Microvm {
    Microvm::new(probe_kernel_virtio()).cmdline(cmdline)
}

/// A raw image of `DISK_MIB` MiB: the pattern over the first `pattern_mib`
/// MiB, zeros after.
fn image(dir: &TempDir, name: &str, pattern_mib: usize, seed: u64) -> PathBuf {
    let mut bytes = vec![0; DISK_MIB * MIB];
    blkpattern::fill(&mut bytes[..pattern_mib * MIB], 0, seed);
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write the test image");
    path
}

fn assert_ok(run: &VmRun) {
    assert_eq!(run.probe.done, Some(Ok(())), "{}", run.describe());
    assert_eq!(run.exit_code(), Some(1), "{}", run.describe());
}

fn assert_fails_with(run: &VmRun, why: &str) {
    match &run.probe.done {
        Some(Err(message)) => assert!(message.contains(why), "{message:?}\n{}", run.describe()),
        other => panic!(
            "expected a failure with {why:?}, got {other:?}\n{}",
            run.describe()
        ),
    }
    assert_eq!(run.exit_code(), Some(3), "{}", run.describe());
}

/// The one `PROBE RESULT blk` line, checked for sane figures.
fn blk_result(run: &VmRun, requests: f64) -> (f64, f64) {
    let results: Vec<_> = run.probe.results_of("blk").collect();
    assert_eq!(results.len(), 1, "{}", run.describe());
    assert_eq!(
        results[0].num("requests"),
        Some(requests),
        "{}",
        run.describe()
    );
    let mb_s = results[0].num("mb_s").expect("mb_s");
    let iops = results[0].num("iops").expect("iops");
    assert!(mb_s > 0.0 && iops > 0.0, "{}", run.describe());
    (mb_s, iops)
}

fn qemu_img_compare(a: &Path, b: &Path) -> std::process::Output {
    Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .args([a, b])
        .output()
        .expect("run qemu-img compare")
}

#[test]
fn heavy_qemu_blk_seqwrite_lands_on_the_host_file() {
    if !prerequisites() {
        return;
    }
    let dir = TempDir::new("seqwrite");
    let disk = image(&dir, "disk.raw", 0, 0);
    let run = boot(
        vm(&format!(
            "probe=blk probe.mode=seqwrite probe.mib=8 probe.bs=65536 probe.verify=1 probe.seed={SEED}"
        ))
        .virtio_disk(&disk, false),
    );
    assert_ok(&run);
    let (mb_s, iops) = blk_result(&run, 128.0);
    eprintln!("qemu microvm blk seqwrite 64 KiB: {mb_s} MB/s, {iops} IOPS");

    let written = std::fs::read(&disk).unwrap();
    assert_eq!(blkpattern::check(&written[..8 * MIB], 0, SEED), Ok(()));
    assert!(
        written[8 * MIB..].iter().all(|&b| b == 0),
        "the guest wrote past probe.mib"
    );
    let expected = image(&dir, "expected.raw", 8, SEED);
    let compare = qemu_img_compare(&expected, &disk);
    assert!(compare.status.success(), "qemu-img compare: {compare:?}");
    // The comparison itself must be able to fail: one flipped byte.
    let mut flipped = written;
    flipped[5 * MIB + 3] ^= 0x40;
    std::fs::write(&disk, flipped).unwrap();
    assert!(!qemu_img_compare(&expected, &disk).status.success());
}

#[test]
fn heavy_qemu_blk_reads_verify_a_host_written_pattern() {
    if !prerequisites() {
        return;
    }
    let dir = TempDir::new("reads");
    let disk = image(&dir, "disk.raw", 16, SEED);
    for (mode, bs, requests) in [("seqread", 1 << 20, 16.0), ("randread", 4096, 4096.0)] {
        let run = boot(
            vm(&format!(
                "probe=blk probe.mode={mode} probe.mib=16 probe.bs={bs} probe.verify=1 probe.seed={SEED}"
            ))
            .virtio_disk(&disk, true),
        );
        assert_ok(&run);
        let (mb_s, iops) = blk_result(&run, requests);
        eprintln!("qemu microvm blk {mode} bs={bs}: {mb_s} MB/s, {iops} IOPS");
    }

    // A wrong seed, then one corrupted word: the guest names the sector.
    let run = boot(
        vm("probe=blk probe.mode=seqread probe.mib=16 probe.verify=1 probe.seed=1")
            .virtio_disk(&disk, true),
    );
    // Every sector mismatches; which is checked first depends on the order
    // in which the 16 requests in flight complete.
    assert_fails_with(&run, "blk verify: sector ");
    assert_fails_with(&run, " offset 0 holds ");
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[12345 * SECTOR + 64] ^= 1;
    std::fs::write(&disk, bytes).unwrap();
    let run = boot(
        vm(&format!(
            "probe=blk probe.mode=seqread probe.mib=16 probe.bs=131072 probe.verify=1 probe.seed={SEED}"
        ))
        .virtio_disk(&disk, true),
    );
    assert_fails_with(&run, "blk verify: sector 12345 offset 64");
}

#[test]
fn heavy_qemu_blk_randwrite_reads_back_what_it_wrote() {
    if !prerequisites() {
        return;
    }
    let dir = TempDir::new("randwrite");
    let disk = image(&dir, "disk.raw", 0, 0);
    let run = boot(
        vm(&format!(
            "probe=blk probe.mode=randwrite probe.mib=4 probe.bs=4096 probe.verify=1 probe.seed={SEED}"
        ))
        .virtio_disk(&disk, false),
    );
    assert_ok(&run);
    let (mb_s, iops) = blk_result(&run, 1024.0);
    eprintln!("qemu microvm blk randwrite 4 KiB: {mb_s} MB/s, {iops} IOPS");
    // Every 4 KiB block is either untouched (zeros) or holds the pattern,
    // and random offsets leave some of each.
    let written = std::fs::read(&disk).unwrap();
    let blocks = written[..4 * MIB].chunks_exact(4096).enumerate();
    let (mut patterned, mut zero) = (0, 0);
    for (index, block) in blocks {
        if block.iter().all(|&b| b == 0) {
            zero += 1;
        } else {
            assert_eq!(blkpattern::check(block, index as u64 * 8, SEED), Ok(()));
            patterned += 1;
        }
    }
    assert!(
        patterned > 512 && zero > 100,
        "{patterned} written, {zero} untouched"
    );
    assert!(written[4 * MIB..].iter().all(|&b| b == 0));
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
}

#[test]
fn heavy_qemu_blk_qcow2_overlay_over_a_raw_backing_file() {
    if !prerequisites() {
        return;
    }
    const BASE_SEED: u64 = 0xba5e;
    let dir = TempDir::new("qcow2");
    let base = image(&dir, "base.raw", DISK_MIB, BASE_SEED);
    let overlay = dir.path().join("overlay.qcow2");
    let (base_s, overlay_s) = (base.to_str().unwrap(), overlay.to_str().unwrap());
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", base_s, "-F", "raw", overlay_s,
    ]);
    let run = boot(
        vm(&format!(
            "probe=blk probe.mode=seqwrite probe.mib=4 probe.bs=262144 probe.verify=1 probe.seed={SEED}"
        ))
        .virtio_disk_as(&overlay, "qcow2", false),
    );
    assert_ok(&run);
    blk_result(&run, 16.0);

    // The overlay reads as the guest's 4 MiB over the backing file's pattern,
    // and the backing file is untouched.
    let mut expected = std::fs::read(&base).unwrap();
    blkpattern::fill(&mut expected[..4 * MIB], 0, SEED);
    let expected_path = dir.path().join("expected.raw");
    std::fs::write(&expected_path, &expected).unwrap();
    let compare = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .args([&expected_path, &overlay])
        .output()
        .unwrap();
    assert!(compare.status.success(), "qemu-img compare: {compare:?}");
    let flat = dir.path().join("flat.raw");
    qemu_img(&["convert", "-O", "raw", overlay_s, flat.to_str().unwrap()]);
    let flat = std::fs::read(&flat).unwrap();
    assert_eq!(blkpattern::check(&flat[..4 * MIB], 0, SEED), Ok(()));
    assert_eq!(blkpattern::check(&flat[4 * MIB..], 8192, BASE_SEED), Ok(()));
    let base_now = std::fs::read(&base).unwrap();
    assert_eq!(blkpattern::check(&base_now, 0, BASE_SEED), Ok(()));

    // And the guest reads the backing file's pattern through the overlay.
    let run = boot(
        vm(&format!(
            "probe=blk probe.mode=randread probe.mib=4 probe.verify=1 probe.seed={SEED}"
        ))
        .virtio_disk_as(&overlay, "qcow2", true),
    );
    assert_ok(&run);
}

#[test]
fn heavy_qemu_blk_readonly_disk_refuses_writes() {
    if !prerequisites() {
        return;
    }
    let dir = TempDir::new("readonly");
    let disk = image(&dir, "disk.raw", 2, SEED);
    let before = std::fs::read(&disk).unwrap();
    let run =
        boot(vm("probe=blk probe.mode=seqwrite probe.mib=1 probe.seed=9").virtio_disk(&disk, true));
    assert_fails_with(&run, "write of 4096 bytes at sector 0 failed: I/O error");
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "read-only disk changed"
    );
}

#[test]
fn heavy_qemu_blk_bad_parameters_are_named() {
    if !prerequisites() {
        return;
    }
    let dir = TempDir::new("badparams");
    let disk = image(&dir, "disk.raw", 0, 0);
    for (cmdline, why) in [
        (
            "probe=blk",
            "probe.mode=seqwrite|seqread|randwrite|randread is missing",
        ),
        (
            "probe=blk probe.mode=append",
            "probe.mode=append is not one of",
        ),
        (
            "probe=blk probe.mode=seqread probe.bs=1000",
            "probe.bs=1000 must be a multiple of 512",
        ),
        (
            "probe=blk probe.mode=seqread probe.mib=25",
            "needs 51200 sectors, the disk has 49152",
        ),
    ] {
        assert_fails_with(&boot(vm(cmdline).virtio_disk(&disk, false)), why);
    }
    // No device announced, and an announced slot that is empty.
    assert_fails_with(
        &boot(vm("probe=blk probe.mode=seqread")),
        "no virtio-mmio Block device among the 0",
    );
    assert_fails_with(
        &boot(vm("probe=blk probe.mode=seqread").virtio_device("virtio-rng-device")),
        "no virtio-mmio Block device among the 1",
    );
    assert_fails_with(
        &boot(vm(
            "probe=blk probe.mode=seqread virtio_mmio.device=512@0xfeb00001:5",
        )),
        "bad virtio_mmio.device=512@0xfeb00001:5: base is not 4-byte aligned",
    );
}

#[test]
fn heavy_qemu_rng_reads_entropy() {
    if !prerequisites() {
        return;
    }
    let run = boot(vm("probe=rng probe.bytes=65536").virtio_device("virtio-rng-device"));
    assert_ok(&run);
    let rng: Vec<_> = run.probe.results_of("rng").collect();
    assert_eq!(rng.len(), 1, "{}", run.describe());
    assert_eq!(rng[0].num("bytes"), Some(65536.0));
    assert_eq!(rng[0].num("distinct"), Some(256.0), "{}", run.describe());
}

/// Echoes `data` through the guest's TCP server: a writer thread sends
/// while this thread reads the echo back.
fn tcp_echo(port: u16, data: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the guest");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sent = data.to_vec();
    let sender = std::thread::spawn(move || writer.write_all(&sent));
    let mut echoed = vec![0; data.len()];
    stream.read_exact(&mut echoed).expect("read the echo");
    sender.join().unwrap().expect("send to the guest");
    echoed
}

#[test]
fn heavy_qemu_net_tcp_and_udp_echo() {
    if !prerequisites() {
        return;
    }
    let (tcp_port, udp_port) = (free_port(), free_port());
    // Host-forwarded ports on 127.0.0.1 only; the probe never starts
    // traffic itself. (`restrict=on` would also drop the UDP replies.)
    let netdev = format!(
        "user,id=net0,net=10.0.2.0/24,\
         hostfwd=tcp:127.0.0.1:{tcp_port}-10.0.2.15:7,hostfwd=udp:127.0.0.1:{udp_port}-10.0.2.15:7"
    );
    let mut command = vm("probe=net probe.ip=10.0.2.15/24 probe.port=7")
        .memory_mib(96)
        .arg("-netdev")
        .arg(netdev)
        .virtio_device("virtio-net-device,netdev=net0")
        .command();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start QEMU");
    let (lines_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let wait_for = |prefix: &str| -> String {
        loop {
            match lines.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(err) => panic!("no line starting {prefix:?}: {err}"),
            }
        }
    };
    let listening = wait_for("PROBE RESULT net listening");
    assert!(listening.contains("ip=10.0.2.15/24 port=7"), "{listening}");

    // 4 MiB of non-repeating data (a counter pattern) through TCP.
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i ^ (i >> 11)) as u8).collect();
    let start = std::time::Instant::now();
    let echoed = tcp_echo(tcp_port, &data);
    eprintln!(
        "qemu microvm net (slirp) TCP echo: {:.1} MB/s",
        data.len() as f64 / start.elapsed().as_secs_f64() / 1e6
    );
    assert!(echoed == data, "the TCP echo differs from what was sent");

    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for datagram in [&b"ping"[..], &[0xa5; 1200][..]] {
        udp.send_to(datagram, ("127.0.0.1", udp_port)).unwrap();
        let mut buf = [0; 2048];
        let (len, _) = udp.recv_from(&mut buf).expect("UDP echo");
        assert_eq!(&buf[..len], datagram);
    }

    TcpStream::connect(("127.0.0.1", tcp_port))
        .and_then(|mut quit| quit.write_all(b"quit"))
        .expect("send quit");
    let summary = wait_for("PROBE RESULT net tcp_bytes");
    assert!(
        summary.contains(&format!("tcp_bytes={}", data.len())),
        "{summary}"
    );
    assert!(summary.contains("udp_datagrams=2"), "{summary}");
    assert_eq!(wait_for("PROBE DONE"), "PROBE DONE ok");
    let status = child.wait().expect("QEMU exit");
    assert_eq!(status.code(), Some(1));
}

#[test]
fn heavy_qemu_net_bad_address_is_named() {
    if !prerequisites() {
        return;
    }
    let run = boot(vm("probe=net probe.ip=10.0.2.315/24").virtio_device("virtio-rng-device"));
    assert_fails_with(&run, "probe.ip=10.0.2.315/24: an octet is not a number");
}
