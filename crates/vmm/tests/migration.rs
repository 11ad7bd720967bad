//! The migration engine end to end between two in-process guest memories,
//! with a writer thread dirtying the source through vm-memory (so its
//! dirty bitmap sees the writes) while the migration runs.

use std::io::{Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::GuestMemory;
use serde_json::Value;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::migration::{
    migrate, receive, Capabilities, DirtyBitmap, Incoming, MigratableVm, MigrationControl,
    MigrationStatus, MigrationUri, Parameters, Received, SavedState, SourceError, VmOpError,
    PAGE_SIZE,
};

/// Two regions with a hole between them, as the VMM's RAM around the MMIO gap.
const RANGES: [(u64, usize); 2] = [(0, 6 << 20), (8 << 20, 2 << 20)];

fn new_memory() -> GuestMemory {
    let ranges: Vec<_> = RANGES.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    GuestMemory::from_ranges(&ranges).unwrap()
}

fn page_addrs() -> Vec<u64> {
    RANGES
        .iter()
        .flat_map(|&(a, l)| (0..(l / PAGE_SIZE) as u64).map(move |p| a + p * PAGE_SIZE as u64))
        .collect()
}

/// Random-ish data in the first two thirds of the pages, zeros after.
fn fill(memory: &GuestMemory) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let addrs = page_addrs();
    let mut page = vec![0u8; PAGE_SIZE];
    for addr in &addrs[..addrs.len() * 2 / 3] {
        for b in page.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        memory.write_slice(&page, GuestAddress(*addr)).unwrap();
    }
}

fn snapshot(memory: &GuestMemory) -> Vec<u8> {
    let mut out = Vec::new();
    for r in memory.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        memory.read_slice(&mut buf, r.start_addr()).unwrap();
        out.extend(buf);
    }
    out
}

/// Writes into guest memory at a dirty sync (its number given).
type Workload = Box<dyn FnMut(&GuestMemory, u64)>;

/// Lets pause() wait until the writer stands still.
#[derive(Default)]
struct Gate {
    paused: AtomicBool,
    lock: Mutex<()>,
}

/// The source VM: memory, a writer thread standing in for the vCPUs.
struct TestVm {
    memory: GuestMemory,
    gate: Arc<Gate>,
    logging: bool,
    /// Deterministic workload: called at each dirty sync with the sync number.
    on_sync: Option<Workload>,
    syncs: u64,
    fail_save: bool,
    pauses: u32,
    resumes: u32,
}

impl TestVm {
    fn new() -> Self {
        let memory = new_memory();
        fill(&memory);
        TestVm {
            memory,
            gate: Arc::default(),
            logging: false,
            on_sync: None,
            syncs: 0,
            fail_save: false,
            pauses: 0,
            resumes: 0,
        }
    }

    fn state() -> SavedState {
        SavedState {
            vcpus: vec![b"vcpu0 regs".to_vec(), b"vcpu1 regs".to_vec()],
            devices: vec![
                ("vm".into(), b"clock".to_vec()),
                ("virtio-blk@0".into(), b"{}".to_vec()),
            ],
        }
    }
}

impl MigratableVm for TestVm {
    fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    fn set_dirty_logging(&mut self, enable: bool) -> Result<(), VmOpError> {
        self.logging = enable;
        Ok(())
    }

    fn take_dirty_pages(&mut self) -> Result<DirtyBitmap, VmOpError> {
        if let Some(hook) = &mut self.on_sync {
            hook(&self.memory, self.syncs);
        }
        self.syncs += 1;
        Ok(self
            .memory
            .iter()
            .map(|r| {
                (
                    r.start_addr().0,
                    std::ops::Deref::deref(r).bitmap().get_and_reset(),
                )
            })
            .collect())
    }

    fn pause(&mut self) {
        self.pauses += 1;
        self.gate.paused.store(true, Ordering::SeqCst);
        drop(self.gate.lock.lock().unwrap());
    }

    fn resume(&mut self) {
        self.resumes += 1;
        self.gate.paused.store(false, Ordering::SeqCst);
    }

    fn save_state(&mut self) -> Result<SavedState, VmOpError> {
        if self.fail_save {
            return Err("device refuses to save".into());
        }
        Ok(TestVm::state())
    }
}

/// A writer dirtying `pages_per_slice` pages (8 bytes each, a counter) per
/// 10 ms slice, obeying pause and the auto-converge throttle.
struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

fn start_writer(vm: &TestVm, control: Arc<MigrationControl>, pages_per_slice: usize) -> Writer {
    let memory = vm.memory.clone();
    let gate = vm.gate.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let (stop2, writes2) = (stop.clone(), writes.clone());
    let thread = std::thread::spawn(move || {
        // The pages `fill` gave data: the zero pages stay zero.
        let mut addrs = page_addrs();
        addrs.truncate(addrs.len() * 2 / 3);
        let mut next = 0usize;
        let mut counter = 1u64;
        while !stop2.load(Ordering::Relaxed) {
            let slice = Instant::now();
            {
                let _g = gate.lock.lock().unwrap();
                if !gate.paused.load(Ordering::SeqCst) {
                    for _ in 0..pages_per_slice {
                        let addr = addrs[next] + (counter % 500) * 8;
                        memory.write_obj(counter, GuestAddress(addr)).unwrap();
                        counter += 1;
                        next = (next + 1) % addrs.len();
                    }
                    writes2.fetch_add(pages_per_slice as u64, Ordering::Relaxed);
                }
            }
            let ran = slice.elapsed();
            std::thread::sleep(
                Duration::from_millis(10).saturating_sub(ran) + control.throttle_sleep(),
            );
        }
    });
    Writer {
        stop,
        writes,
        thread,
    }
}

impl Writer {
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.writes.load(Ordering::Relaxed)
    }
}

/// Starts the destination on `uri`; returns the URI the source should use.
/// What the destination received; it confirmed before returning it, as
/// the VMM does once it has restored the state.
type Got = (Vec<Vec<u8>>, Vec<(String, Vec<u8>)>);

/// The destination thread's result: its memory and what it received.
type Destination = JoinHandle<(GuestMemory, Result<Got, String>)>;

fn start_destination(uri: &str) -> (MigrationUri, Destination) {
    let uri: MigrationUri = uri.parse().unwrap();
    let mut incoming = Incoming::open(&uri).unwrap();
    let source_uri = incoming.local_uri(&uri);
    let handle = std::thread::spawn(move || {
        let memory = new_memory();
        let result = receive(&mut incoming, &uri, &memory)
            .and_then(|r: Received| {
                let got = (r.vcpus.clone(), r.devices.clone());
                r.confirm().map(|()| got)
            })
            .map_err(|e| e.to_string());
        (memory, result)
    });
    (source_uri, handle)
}

type EventLog = Arc<Mutex<Vec<(String, Value)>>>;

fn run_migration(
    vm: &mut TestVm,
    uri: &MigrationUri,
    caps: Capabilities,
    params: Parameters,
    control: &MigrationControl,
) -> (Result<(), SourceError>, EventLog) {
    let log: EventLog = Arc::default();
    let log2 = log.clone();
    let events = move |name: &str, data: Value| log2.lock().unwrap().push((name.to_string(), data));
    let result = migrate(vm, uri, caps, params, control, &events);
    (result, log)
}

/// Migrates with a concurrent writer; checks memory, state, stats, events.
fn migrate_with_writer(uri: &str, caps: Capabilities) {
    let dir = tempfile::tempdir().unwrap();
    let uri = uri.replace("DIR", dir.path().to_str().unwrap());
    let (source_uri, dest) = start_destination(&uri);
    let mut vm = TestVm::new();
    let control = Arc::new(MigrationControl::default());
    let writer = start_writer(&vm, control.clone(), 300);
    let caps = Capabilities {
        events: true,
        ..caps
    };
    let (result, log) = run_migration(&mut vm, &source_uri, caps, Parameters::default(), &control);
    result.unwrap();
    let writes = writer.stop();
    let (dest_memory, received) = dest.join().unwrap();
    let received = received.unwrap();
    assert_eq!(received.0, TestVm::state().vcpus);
    assert_eq!(received.1, TestVm::state().devices);
    assert!(writes > 0, "the writer ran");
    assert!(
        snapshot(&dest_memory) == snapshot(&vm.memory),
        "destination memory differs from the source"
    );
    assert_eq!(
        (vm.pauses, vm.resumes),
        (1, 0),
        "the source stays paused after completion"
    );
    assert!(!vm.logging);
    let info = control.info();
    eprintln!("{uri} {caps:?}: {}", serde_json::to_string(&info).unwrap());
    assert_eq!(info.status, MigrationStatus::Completed);
    let ram = info.ram.unwrap();
    assert_eq!(ram.total, 8 << 20);
    assert!(ram.duplicate >= 512, "zero pages sent as flags: {ram:?}");
    assert!(ram.dirty_sync_count >= 2, "{ram:?}");
    assert!(info.downtime.is_some() && info.total_time.is_some() && info.setup_time.is_some());
    let log = log.lock().unwrap();
    let states: Vec<&str> = log
        .iter()
        .filter(|(n, _)| n == "MIGRATION")
        .map(|(_, d)| d["status"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["setup", "active", "device", "completed"]);
    assert!(log
        .iter()
        .any(|(n, d)| n == "MIGRATION_PASS" && d["pass"] == 1));
}

#[test]
fn heavy_migration_over_unix_with_writer() {
    migrate_with_writer("unix:DIR/mig.sock", Capabilities::default());
}

#[test]
fn heavy_migration_over_tcp_loopback_with_writer() {
    migrate_with_writer("tcp:127.0.0.1:0", Capabilities::default());
}

#[test]
fn heavy_migration_multifd_over_tcp_with_writer() {
    migrate_with_writer(
        "tcp:127.0.0.1:0",
        Capabilities {
            multifd: true,
            ..Capabilities::default()
        },
    );
}

#[test]
fn heavy_migration_xbzrle_over_unix_with_writer() {
    migrate_with_writer(
        "unix:DIR/mig.sock",
        Capabilities {
            xbzrle: true,
            ..Capabilities::default()
        },
    );
}

#[test]
fn heavy_migration_over_a_socket_pair_fd() {
    let (a, b) = UnixStream::pair().unwrap();
    let (src_fd, dst_fd) = (a.into_raw_fd(), b.into_raw_fd());
    let (_, dest) = start_destination(&format!("fd:{dst_fd}"));
    let mut vm = TestVm::new();
    let control = MigrationControl::default();
    let uri: MigrationUri = format!("fd:{src_fd}").parse().unwrap();
    let (result, _) = run_migration(
        &mut vm,
        &uri,
        Capabilities::default(),
        Parameters::default(),
        &control,
    );
    result.unwrap();
    let (dest_memory, received) = dest.join().unwrap();
    received.unwrap();
    assert!(snapshot(&dest_memory) == snapshot(&vm.memory));
}

/// Dirties 16 bytes of every page at the first `passes` syncs.
fn few_bytes_per_page(passes: u64) -> Workload {
    Box::new(move |memory, sync| {
        if sync == 0 || sync > passes {
            return;
        }
        for addr in page_addrs() {
            memory.write_obj(sync, GuestAddress(addr + 64)).unwrap();
            memory.write_obj(!sync, GuestAddress(addr + 2048)).unwrap();
        }
    })
}

fn transferred_with(xbzrle: bool) -> (u64, Value) {
    let (uri, dest) = start_destination("tcp:127.0.0.1:0");
    let mut vm = TestVm::new();
    vm.on_sync = Some(few_bytes_per_page(4));
    let control = MigrationControl::default();
    let caps = Capabilities {
        xbzrle,
        ..Capabilities::default()
    };
    let params = Parameters {
        downtime_limit: 0,
        ..Parameters::default()
    };
    let (result, _) = run_migration(&mut vm, &uri, caps, params, &control);
    result.unwrap();
    let (dest_memory, received) = dest.join().unwrap();
    received.unwrap();
    assert!(snapshot(&dest_memory) == snapshot(&vm.memory));
    let info = control.info();
    let json = serde_json::to_value(&info).unwrap();
    (info.ram.unwrap().transferred, json)
}

#[test]
fn heavy_xbzrle_cuts_bytes_for_a_few_bytes_per_page() {
    let (plain, _) = transferred_with(false);
    let (xbzrle, info) = transferred_with(true);
    eprintln!("ram.transferred: plain {plain}, xbzrle {xbzrle}");
    // Bulk (8 MiB) + 4 full passes without; bulk + 1 full pass (cache
    // misses) + 3 passes of ~20-byte deltas with.
    assert!(xbzrle * 10 < plain * 6, "plain {plain}, xbzrle {xbzrle}");
    let cache = &info["xbzrle-cache"];
    assert_eq!(cache["cache-miss"], 2048);
    assert!(cache["pages"].as_u64().unwrap() >= 3 * 2048, "{cache}");
    assert!(cache["encoding-rate"].as_f64().unwrap() > 50.0, "{cache}");
    assert_eq!(cache["overflow"], 0);
}

/// Bandwidth low, dirty rate high: without auto-converge it never completes.
fn hard_to_converge() -> Parameters {
    Parameters {
        max_bandwidth: 8 << 20,
        cpu_throttle_initial: 80,
        cpu_throttle_increment: 10,
        ..Parameters::default()
    }
}

#[test]
fn heavy_no_convergence_stays_active_and_cancel_leaves_the_source_running() {
    let (uri, dest) = start_destination("tcp:127.0.0.1:0");
    let mut vm = TestVm::new();
    let control = Arc::new(MigrationControl::default());
    let writer = start_writer(&vm, control.clone(), 400);
    let control2 = control.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        let info = control2.info();
        control2.cancel();
        info
    });
    let (result, log) = run_migration(
        &mut vm,
        &uri,
        Capabilities {
            events: true,
            ..Capabilities::default()
        },
        hard_to_converge(),
        &control,
    );
    let before_cancel = canceller.join().unwrap();
    assert_eq!(
        before_cancel.status,
        MigrationStatus::Active,
        "{before_cancel:?}"
    );
    assert!(before_cancel.ram.unwrap().dirty_sync_count >= 2);
    assert!(matches!(result, Err(SourceError::Cancelled)), "{result:?}");
    assert_eq!(control.info().status, MigrationStatus::Cancelled);
    assert!(!vm.logging && !vm.gate.paused.load(Ordering::SeqCst));
    // The guest keeps running here.
    let before = writer.writes.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(100));
    assert!(writer.stop() > before, "the writer runs after cancel");
    let (_, received) = dest.join().unwrap();
    let err = received.err().unwrap();
    assert!(err.contains("truncated") || err.contains("I/O"), "{err}");
    let last = log.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.1["status"], "cancelled");
}

#[test]
fn heavy_auto_converge_throttles_and_completes() {
    let (uri, dest) = start_destination("tcp:127.0.0.1:0");
    let mut vm = TestVm::new();
    let control = Arc::new(MigrationControl::default());
    let writer = start_writer(&vm, control.clone(), 400);
    let control2 = control.clone();
    let peak = Arc::new(AtomicU64::new(0));
    let peak2 = peak.clone();
    let watcher = std::thread::spawn(move || loop {
        let info = control2.info();
        if let Some(p) = info.cpu_throttle_percentage {
            peak2.fetch_max(u64::from(p), Ordering::Relaxed);
        }
        if !info.status.is_running() && info.status != MigrationStatus::None {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    });
    let caps = Capabilities {
        auto_converge: true,
        ..Capabilities::default()
    };
    let started = Instant::now();
    let (result, _) = run_migration(&mut vm, &uri, caps, hard_to_converge(), &control);
    result.unwrap();
    writer.stop();
    watcher.join().unwrap();
    let (dest_memory, received) = dest.join().unwrap();
    received.unwrap();
    assert!(snapshot(&dest_memory) == snapshot(&vm.memory));
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "auto-converge: completed in {:?}, peak throttle {peak}%",
        started.elapsed()
    );
    assert!(peak >= 80, "throttle reached cpu-throttle-initial: {peak}");
    assert_eq!(
        control.throttle_percentage(),
        0,
        "throttle lifted after migration"
    );
}

/// Decides per chunk of a connection's forward stream (connection number
/// in accept order, offset, bytes) whether to pass it on or cut the connection.
type Tamper = Arc<dyn Fn(usize, u64, &mut [u8]) -> bool + Send + Sync>;

/// A unix proxy between source and destination that applies `tamper` to
/// the forward stream of every connection it accepts.
fn tampering_proxy(dir: &Path, dest: &MigrationUri, tamper: Tamper) -> MigrationUri {
    let path = dir.join("proxy.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let MigrationUri::Unix(dest_path) = dest.clone() else {
        panic!("unix destination expected")
    };
    std::thread::spawn(move || {
        for (conn, src) in listener.incoming().enumerate() {
            let Ok(src) = src else { return };
            let dst = UnixStream::connect(&dest_path).unwrap();
            let tamper = tamper.clone();
            std::thread::spawn(move || forward(conn, src, dst, &*tamper));
        }
    });
    MigrationUri::Unix(path)
}

fn forward(
    conn: usize,
    mut src: UnixStream,
    mut dst: UnixStream,
    tamper: &(dyn Fn(usize, u64, &mut [u8]) -> bool + Send + Sync),
) {
    let (mut src_back, mut dst_back) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut dst_back, &mut src_back);
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut offset = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !tamper(conn, offset, &mut buf[..n]) || dst.write_all(&buf[..n]).is_err() {
            break;
        }
        offset += n as u64;
    }
    let _ = src.shutdown(std::net::Shutdown::Both);
    let _ = dst.shutdown(std::net::Shutdown::Both);
}

fn failed_migration(
    tamper: impl Fn(u64, &mut [u8]) -> bool + Send + Sync + 'static,
) -> (String, String) {
    failed_migration_with(
        Capabilities::default(),
        Arc::new(move |_, offset, buf| tamper(offset, buf)),
    )
}

/// A migration through `tampering_proxy` that must fail: checks that the
/// source runs on as before; returns both sides' errors.
fn failed_migration_with(caps: Capabilities, tamper: Tamper) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let (dest_uri, dest) = start_destination(&format!("unix:{}/dest.sock", dir.path().display()));
    let uri = tampering_proxy(dir.path(), &dest_uri, tamper);
    let mut vm = TestVm::new();
    let before = snapshot(&vm.memory);
    let control = MigrationControl::default();
    let (result, _) = run_migration(&mut vm, &uri, caps, Parameters::default(), &control);
    let source_err = result.unwrap_err().to_string();
    assert_eq!(control.info().status, MigrationStatus::Failed);
    assert_eq!(
        control.info().error_desc.as_deref(),
        Some(source_err.as_str())
    );
    assert!(snapshot(&vm.memory) == before, "source memory untouched");
    assert!(!vm.logging && !vm.gate.paused.load(Ordering::SeqCst));
    assert_eq!(vm.pauses, vm.resumes, "the source runs again");
    let (_, received) = dest.join().unwrap();
    (source_err, received.err().unwrap())
}

#[test]
fn heavy_flipped_byte_fails_both_sides_and_the_source_keeps_running() {
    let (source_err, dest_err) = failed_migration(|offset, buf| {
        let target = 1_000_000u64;
        if (offset..offset + buf.len() as u64).contains(&target) {
            buf[(target - offset) as usize] ^= 0x20;
        }
        true
    });
    assert!(dest_err.contains("CRC32C"), "{dest_err}");
    eprintln!("source: {source_err}\ndestination: {dest_err}");
}

#[test]
fn heavy_killed_connection_fails_both_sides_and_the_source_keeps_running() {
    let (source_err, dest_err) = failed_migration(|offset, _| offset < 2_000_000);
    assert!(dest_err.contains("truncated"), "{dest_err}");
    eprintln!("source: {source_err}\ndestination: {dest_err}");
}

#[test]
fn heavy_multifd_channel_cut_midway_fails_cleanly_and_the_source_keeps_running() {
    let caps = Capabilities {
        multifd: true,
        ..Capabilities::default()
    };
    // Connections in order: main, channel 1, channel 2; channel 2 is cut
    // after 1 MiB of its pages.
    let (source_err, dest_err) = failed_migration_with(
        caps,
        Arc::new(|conn, offset, _| conn != 2 || offset < 1 << 20),
    );
    eprintln!("source: {source_err}\ndestination: {dest_err}");
    assert!(source_err.contains("multifd channel"), "{source_err}");
    assert!(dest_err.contains("truncated"), "{dest_err}");
}

#[test]
fn heavy_multifd_cancel_midway_leaves_the_source_running() {
    let (uri, dest) = start_destination("tcp:127.0.0.1:0");
    let mut vm = TestVm::new();
    let control = Arc::new(MigrationControl::default());
    let writer = start_writer(&vm, control.clone(), 400);
    let control2 = control.clone();
    let canceller = std::thread::spawn(move || {
        while control2.info().ram.map_or(0, |r| r.dirty_sync_count) < 2 {
            std::thread::sleep(Duration::from_millis(10));
        }
        control2.cancel();
    });
    let caps = Capabilities {
        multifd: true,
        ..Capabilities::default()
    };
    let params = Parameters {
        multifd_channels: 3,
        ..hard_to_converge()
    };
    let (result, _) = run_migration(&mut vm, &uri, caps, params, &control);
    canceller.join().unwrap();
    assert!(matches!(result, Err(SourceError::Cancelled)), "{result:?}");
    assert_eq!(control.info().status, MigrationStatus::Cancelled);
    assert!(!vm.logging && !vm.gate.paused.load(Ordering::SeqCst));
    let before = writer.writes.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(100));
    assert!(writer.stop() > before, "the writer runs after cancel");
    assert!(dest.join().unwrap().1.is_err(), "the destination fails");
}

#[test]
fn heavy_file_snapshot_restores_and_a_failed_save_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let uri = MigrationUri::File(path.clone());
    let mut vm = TestVm::new();
    vm.fail_save = true;
    let control = MigrationControl::default();
    let (result, _) = run_migration(
        &mut vm,
        &uri,
        Capabilities::default(),
        Parameters::default(),
        &control,
    );
    let err = result.unwrap_err().to_string();
    assert!(err.contains("device refuses to save"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no file at all"
    );
    assert_eq!(vm.pauses, vm.resumes);
    vm.fail_save = false;
    let (result, _) = run_migration(
        &mut vm,
        &uri,
        Capabilities::default(),
        Parameters::default(),
        &control,
    );
    result.unwrap();
    let (_, dest) = start_destination(&format!("file:{}", path.display()));
    let (memory, received) = dest.join().unwrap();
    let received = received.unwrap();
    assert_eq!(received.1, TestVm::state().devices);
    assert!(snapshot(&memory) == snapshot(&vm.memory));
    // A truncated snapshot is refused with the offset where it ends.
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let (_, dest) = start_destination(&format!("file:{}", path.display()));
    let err = dest.join().unwrap().1.err().unwrap();
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn heavy_exec_through_gzip_and_gunzip() {
    let dir = tempfile::tempdir().unwrap();
    let gz = dir.path().join("vm.gz");
    let uri: MigrationUri = format!("exec:gzip -1 -c > {}", gz.display())
        .parse()
        .unwrap();
    let mut vm = TestVm::new();
    let control = MigrationControl::default();
    let (result, _) = run_migration(
        &mut vm,
        &uri,
        Capabilities::default(),
        Parameters::default(),
        &control,
    );
    result.unwrap();
    let (_, dest) = start_destination(&format!("exec:gunzip -c {}", gz.display()));
    let (memory, received) = dest.join().unwrap();
    received.unwrap();
    assert!(snapshot(&memory) == snapshot(&vm.memory));
}

#[test]
fn destination_refuses_a_vm_of_another_size() {
    let dir = tempfile::tempdir().unwrap();
    let (uri, dest) = start_destination(&format!("unix:{}/d.sock", dir.path().display()));
    let ranges = [(GuestAddress(0), 4 << 20)];
    let mut vm = TestVm::new();
    vm.memory = GuestMemory::from_ranges(&ranges).unwrap();
    let control = MigrationControl::default();
    let (result, _) = run_migration(
        &mut vm,
        &uri,
        Capabilities::default(),
        Parameters::default(),
        &control,
    );
    let err = result.unwrap_err().to_string();
    let dest_err = dest.join().unwrap().1.err().unwrap();
    assert!(
        dest_err.contains("the source has 4194304 bytes of RAM, this VM 8388608"),
        "{dest_err}"
    );
    assert!(err.contains("4194304"), "the source hears why: {err}");
    assert_eq!(vm.pauses, vm.resumes);
}

#[test]
fn invalid_parameters_are_refused_before_connecting() {
    let mut vm = TestVm::new();
    let control = MigrationControl::default();
    let params = Parameters {
        max_cpu_throttle: 100,
        ..Parameters::default()
    };
    let uri: MigrationUri = "unix:/nonexistent/x.sock".parse().unwrap();
    let (result, _) = run_migration(&mut vm, &uri, Capabilities::default(), params, &control);
    let err = result.unwrap_err().to_string();
    assert!(err.contains("max-cpu-throttle: 100"), "{err}");
    let (result, _) = run_migration(
        &mut vm,
        &uri,
        Capabilities::default(),
        Parameters::default(),
        &control,
    );
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("unix:/nonexistent/x.sock") && err.contains("connecting"),
        "{err}"
    );
    assert_eq!(control.info().status, MigrationStatus::Failed);
}
