//! virtio-blk driven through its virtio-mmio transport by a test driver.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use devices::rate_limiter::{BucketConfig, LimiterConfig};
use devices::virtio::block::{Block, BlockConfig, BlockState, CacheMode};
use devices::virtio::{MmioState, MmioTransport};
use devices::BusDevice;
use vm_memory::{Bytes, GuestAddress};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const HDR: u64 = DATA_BASE;
const STATUS: u64 = DATA_BASE + 0x100;
const DATA: u64 = DATA_BASE + 0x1000;
const DISK_SIZE: u64 = 8 << 20;
const FEATURE_EVENT_IDX: u64 = 1 << 29;

struct Setup {
    driver: Driver<Block>,
    disk: Arc<FileDisk>,
    _dir: tempfile::TempDir,
}

fn setup_with(config: BlockConfig, read_only: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mut disk = FileDisk::create(&dir.path().join("disk.raw"), DISK_SIZE);
    disk.read_only = read_only;
    let disk = Arc::new(disk);
    let block = Block::new(disk.clone(), config).unwrap();
    let mut driver = Driver::new(block);
    driver.init(u64::MAX, 1, 128);
    Setup {
        driver,
        disk,
        _dir: dir,
    }
}

fn setup() -> Setup {
    setup_with(BlockConfig::default(), false)
}

fn write_header(d: &Driver<Block>, kind: u32, sector: u64) {
    d.mem.write_obj(kind.to_le(), GuestAddress(HDR)).unwrap();
    d.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    d.mem
        .write_obj(sector.to_le(), GuestAddress(HDR + 8))
        .unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

/// Sends one request with `data` buffers between header and status;
/// returns (status, used length).
fn request(d: &mut Driver<Block>, kind: u32, sector: u64, data: &[Buf]) -> (u8, u32) {
    write_header(d, kind, sector);
    let mut bufs = vec![rd(HDR, 16)];
    bufs.extend_from_slice(data);
    bufs.push(wr(STATUS, 1));
    let (_, len) = d.submit(0, &bufs);
    (d.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn registers_identify_a_version_2_block_device() {
    let mut s = setup();
    let d = &mut s.driver;
    assert_eq!(d.read_reg(0x000), 0x7472_6976);
    assert_eq!(d.read_reg(0x004), 2);
    assert_eq!(d.read_reg(0x008), 2);
    let f = d.device_features();
    for bit in [32, 2, 6, 9, 13, 14] {
        assert!(f & (1 << bit) != 0, "feature bit {bit} missing in {f:#x}");
    }
    assert_eq!(f & (1 << 5), 0, "RO offered for a writable disk");
    let mut cap = [0u8; 8];
    d.transport.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SIZE / 512);
    let mut blk_size = [0u8; 4];
    d.transport.read(0x100 + 20, &mut blk_size);
    assert_eq!(u32::from_le_bytes(blk_size), 512);
    let mut seg_max = [0u8; 4];
    d.transport.read(0x100 + 12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), 254);
}

#[test]
fn features_without_version_1_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(FileDisk::create(&dir.path().join("d"), DISK_SIZE));
    let mut d = Driver::new(Block::new(disk, BlockConfig::default()).unwrap());
    assert!(!d.negotiate(1 << 9), "legacy driver accepted");
    assert!(d.negotiate(VIRTIO_F_VERSION_1 | 1 << 9));
    assert!(
        !d.negotiate(VIRTIO_F_VERSION_1 | 1 << 40),
        "unoffered feature accepted"
    );
}

#[test]
fn writes_reach_the_file_and_reads_return_it() {
    let mut s = setup();
    let data = pattern(64 * 1024, 7);
    s.driver.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    // Scattered buffers, as a guest's page cache would send them.
    let bufs: Vec<Buf> = (0..16).map(|i| rd(DATA + i * 4096, 4096)).collect();
    assert_eq!(request(&mut s.driver, T_OUT, 100, &bufs), (S_OK, 1));
    let mut on_disk = vec![0u8; data.len()];
    s.disk.file.read_exact_at(&mut on_disk, 100 * 512).unwrap();
    assert_eq!(on_disk, data);

    let other = pattern(8192, 99);
    s.disk.file.write_all_at(&other, 4096 * 512).unwrap();
    let (status, len) = request(
        &mut s.driver,
        T_IN,
        4096,
        &[wr(DATA + 0x10_0000, 3000), wr(DATA + 0x20_0000, 5192)],
    );
    assert_eq!((status, len), (S_OK, 8192 + 1));
    let mut got = vec![0u8; 8192];
    s.driver
        .mem
        .read_slice(&mut got[..3000], GuestAddress(DATA + 0x10_0000))
        .unwrap();
    s.driver
        .mem
        .read_slice(&mut got[3000..], GuestAddress(DATA + 0x20_0000))
        .unwrap();
    assert_eq!(got, other);

    let stats = s.driver.transport.device().handle().stats();
    assert_eq!(
        (stats.wr_req, stats.wr_bytes, stats.rd_req, stats.rd_bytes),
        (1, 65536, 1, 8192)
    );
    assert_eq!(stats.errs, 0);
    assert!(stats.rd_total_times > 0 && stats.wr_total_times > 0);
    assert!(s.driver.irq.count() >= 1, "no used-buffer interrupt");
}

#[test]
fn streamed_writes_with_write_behind_land_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let disk = Arc::new(FileDisk::create(&path, DISK_SIZE));
    let mut block = Block::new(disk.clone(), BlockConfig::default()).unwrap();
    // What `oxvirt vmm` hands it: a read-only descriptor of the image.
    block.set_write_behind(std::fs::File::open(&path).unwrap());
    let mut d = Driver::new(block);
    d.init(u64::MAX, 1, 128);
    // 3 MiB in 512 KiB requests: write-behind starts writeback thrice.
    let data = pattern(3 << 20, 5);
    d.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    for (i, chunk) in (0..6u64).map(|i| (i, DATA + i * (512 << 10))) {
        let sector = 2048 + i * 1024;
        assert_eq!(
            request(&mut d, T_OUT, sector, &[rd(chunk, 512 << 10)]),
            (S_OK, 1)
        );
    }
    assert_eq!(request(&mut d, T_FLUSH, 0, &[]).0, S_OK);
    let mut on_disk = vec![0u8; data.len()];
    disk.file.read_exact_at(&mut on_disk, 2048 * 512).unwrap();
    assert!(
        on_disk == data,
        "the image differs from what the guest wrote"
    );
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
}

#[test]
fn large_request_crosses_the_bounce_buffer() {
    let mut s = setup();
    let data = pattern(3 << 20, 3);
    s.driver.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    assert_eq!(
        request(&mut s.driver, T_OUT, 8, &[rd(DATA, 3 << 20)]).0,
        S_OK
    );
    s.driver
        .mem
        .write_slice(&vec![0u8; 3 << 20], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        request(&mut s.driver, T_IN, 8, &[wr(DATA, 3 << 20)]),
        (S_OK, (3 << 20) + 1)
    );
    let mut got = vec![0u8; 3 << 20];
    s.driver
        .mem
        .read_slice(&mut got, GuestAddress(DATA))
        .unwrap();
    assert!(got == data, "data read back differs");
}

#[test]
fn device_writes_are_marked_dirty_for_migration() {
    let mut s = setup();
    let target = DATA + 0x30_0000;
    let region = s.driver.mem.iter().next().unwrap();
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    assert!(!region.bitmap().dirty_at(target as usize));
    assert_eq!(request(&mut s.driver, T_IN, 0, &[wr(target, 4096)]).0, S_OK);
    let region = s.driver.mem.iter().next().unwrap();
    assert!(
        region.bitmap().dirty_at(target as usize),
        "data page not marked dirty"
    );
    assert!(
        region.bitmap().dirty_at(STATUS as usize),
        "status byte not marked dirty"
    );
    let used_ring = s.driver.queues[0].used as usize;
    assert!(
        region.bitmap().dirty_at(used_ring),
        "used ring not marked dirty"
    );
}

/// Buffers that cross from one memory region into the next move straight
/// between guest memory and a real raw image (diskimg's preadv/pwritev
/// path) both ways, and both regions' pages are marked dirty by the read.
#[test]
fn data_crossing_two_memory_regions_moves_straight_to_and_from_a_raw_image() {
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    const SPLIT: u64 = 8 << 20;
    let mem = vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
        (GuestAddress(0), SPLIT as usize),
        (GuestAddress(SPLIT), SPLIT as usize),
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    diskimg::raw::Raw::create(&path, DISK_SIZE).unwrap();
    let disk = diskimg::open(&path, false, Some(diskimg::Format::Raw)).unwrap();
    let mut d = Driver::with_memory(
        Block::new(Arc::from(disk), BlockConfig::default()).unwrap(),
        mem,
    );
    d.init(u64::MAX, 1, 128);
    let (at, len) = (SPLIT - 0x800, 0x2000u32);
    let data = pattern(len as usize, 9);
    d.mem.write_slice(&data, GuestAddress(at)).unwrap();
    assert_eq!(request(&mut d, T_OUT, 3, &[rd(at, len)]).0, S_OK);
    let mut on_disk = vec![0u8; len as usize];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut on_disk, 3 * 512)
        .unwrap();
    assert!(
        on_disk == data,
        "the image does not hold what the guest wrote"
    );

    // Read into a wider crossing buffer whose outer pages nothing wrote yet.
    let (at, len) = (SPLIT - 0x6000, 0xc000u32);
    let dirty = |d: &Driver<Block>, region: usize, offset: u64| {
        let r = d.mem.iter().nth(region).unwrap();
        r.bitmap().dirty_at(offset as usize)
    };
    assert!(!dirty(&d, 0, at) && !dirty(&d, 1, 0x5000));
    assert_eq!(request(&mut d, T_IN, 0, &[wr(at, len)]).0, S_OK);
    let mut want = vec![0u8; len as usize];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut want, 0)
        .unwrap();
    assert!(want[3 * 512..3 * 512 + data.len()] == data[..]);
    let mut back = vec![0u8; len as usize];
    d.mem.read_slice(&mut back, GuestAddress(at)).unwrap();
    assert!(back == want, "the guest read back something else");
    assert!(dirty(&d, 0, at), "first region's page not dirty");
    assert!(dirty(&d, 1, 0x5000), "second region's page not dirty");
}

#[test]
fn get_id_returns_the_serial() {
    let config = BlockConfig {
        serial: Some("OXVIRT-SERIAL-1".into()),
        ..BlockConfig::default()
    };
    let mut s = setup_with(config, false);
    let (status, len) = request(&mut s.driver, T_GET_ID, 0, &[wr(DATA, 20)]);
    assert_eq!((status, len), (S_OK, 21));
    let mut id = [0u8; 20];
    s.driver
        .mem
        .read_slice(&mut id, GuestAddress(DATA))
        .unwrap();
    assert_eq!(&id[..15], b"OXVIRT-SERIAL-1");
    assert!(id[15..].iter().all(|&b| b == 0));
    let too_long = BlockConfig {
        serial: Some("x".repeat(21)),
        ..BlockConfig::default()
    };
    let disk = Arc::new(FileDisk::create(&s._dir.path().join("e"), 4096));
    let err = Block::new(disk, too_long).err().unwrap();
    assert!(err.to_string().contains("longer than 20 bytes"), "{err}");
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_the_file() {
    let mut s = setup_with(BlockConfig::default(), true);
    assert!(
        s.driver.device_features() & (1 << 5) != 0,
        "RO feature missing"
    );
    s.driver
        .mem
        .write_slice(&[0xaa; 4096], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        request(&mut s.driver, T_OUT, 0, &[rd(DATA, 4096)]).0,
        S_IOERR
    );
    let mut on_disk = [1u8; 4096];
    s.disk.file.read_exact_at(&mut on_disk, 0).unwrap();
    assert!(
        on_disk.iter().all(|&b| b == 0),
        "read-only file was written"
    );
    // Reads still work, and so does a config-forced read-only disk.
    assert_eq!(request(&mut s.driver, T_IN, 0, &[wr(DATA, 512)]).0, S_OK);
    let forced = BlockConfig {
        read_only: true,
        ..BlockConfig::default()
    };
    let mut s = setup_with(forced, false);
    assert_eq!(
        request(&mut s.driver, T_OUT, 0, &[rd(DATA, 512)]).0,
        S_IOERR
    );
    assert_eq!(
        request(&mut s.driver, T_WRITE_ZEROES, 0, &[rd(DATA, 16)]).0,
        S_IOERR
    );
    assert_eq!(s.driver.transport.device().handle().stats().errs, 2);
}

fn flushes_for(cache: CacheMode) -> (usize, u8) {
    let mut s = setup_with(
        BlockConfig {
            cache,
            ..BlockConfig::default()
        },
        false,
    );
    s.driver
        .mem
        .write_slice(&[1; 1024], GuestAddress(DATA))
        .unwrap();
    assert_eq!(request(&mut s.driver, T_OUT, 0, &[rd(DATA, 1024)]).0, S_OK);
    assert_eq!(request(&mut s.driver, T_OUT, 2, &[rd(DATA, 1024)]).0, S_OK);
    let (status, _) = request(&mut s.driver, T_FLUSH, 0, &[]);
    (s.disk.flushes.load(Ordering::SeqCst), status)
}

#[test]
fn cache_modes_flush_as_qemu_does() {
    // writeback and none: only guest flushes reach the disk.
    assert_eq!(flushes_for(CacheMode::Writeback), (1, S_OK));
    assert_eq!(flushes_for(CacheMode::None), (1, S_OK));
    // writethrough: every write, plus the guest's flush.
    assert_eq!(flushes_for(CacheMode::Writethrough), (3, S_OK));
    // unsafe: flushes are acknowledged and ignored.
    assert_eq!(flushes_for(CacheMode::Unsafe), (0, S_OK));
    assert!(CacheMode::None.direct_io() && !CacheMode::Writeback.direct_io());
    assert_eq!(
        "writethrough".parse::<CacheMode>().unwrap(),
        CacheMode::Writethrough
    );
    assert!("sometimes"
        .parse::<CacheMode>()
        .unwrap_err()
        .to_string()
        .contains("sometimes"));
}

fn discard_segment(d: &Driver<Block>, at: u64, sector: u64, count: u32, flags: u32) {
    d.mem.write_obj(sector.to_le(), GuestAddress(at)).unwrap();
    d.mem
        .write_obj(count.to_le(), GuestAddress(at + 8))
        .unwrap();
    d.mem
        .write_obj(flags.to_le(), GuestAddress(at + 12))
        .unwrap();
}

#[test]
fn write_zeroes_and_discard_clear_ranges() {
    let mut s = setup();
    s.disk.file.write_all_at(&[0x5a; 8192], 0).unwrap();
    discard_segment(&s.driver, DATA, 2, 4, 1);
    discard_segment(&s.driver, DATA + 16, 10, 2, 0);
    assert_eq!(
        request(&mut s.driver, T_WRITE_ZEROES, 0, &[rd(DATA, 32)]).0,
        S_OK
    );
    let mut buf = [0u8; 8192];
    s.disk.file.read_exact_at(&mut buf, 0).unwrap();
    for (sector, chunk) in buf.chunks(512).enumerate() {
        let zero = (2..6).contains(&sector) || (10..12).contains(&sector);
        assert_eq!(chunk.iter().all(|&b| b == 0), zero, "sector {sector}");
    }
    discard_segment(&s.driver, DATA, 0, 1, 0);
    assert_eq!(
        request(&mut s.driver, T_DISCARD, 0, &[rd(DATA, 16)]).0,
        S_OK
    );
    // Discard with the unmap flag is not allowed; out of range is an error.
    discard_segment(&s.driver, DATA, 0, 1, 1);
    assert_eq!(
        request(&mut s.driver, T_DISCARD, 0, &[rd(DATA, 16)]).0,
        S_UNSUPP
    );
    discard_segment(&s.driver, DATA, DISK_SIZE / 512 - 1, 2, 0);
    assert_eq!(
        request(&mut s.driver, T_DISCARD, 0, &[rd(DATA, 16)]).0,
        S_IOERR
    );
    assert_eq!(
        request(&mut s.driver, T_DISCARD, 0, &[rd(DATA, 15)]).0,
        S_IOERR
    );
}

/// After each hostile request the device must still serve a good one.
fn assert_still_works(d: &mut Driver<Block>) {
    d.mem.write_slice(&[9; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(request(d, T_OUT, 1, &[rd(DATA, 512)]).0, S_OK);
}

#[test]
fn hostile_requests_get_error_status_and_the_device_keeps_working() {
    let mut s = setup();
    let d = &mut s.driver;
    let cap = DISK_SIZE / 512;
    // Out-of-range and unaligned sectors.
    assert_eq!(request(d, T_IN, cap, &[wr(DATA, 512)]).0, S_IOERR);
    assert_eq!(request(d, T_IN, cap - 1, &[wr(DATA, 1024)]).0, S_IOERR);
    assert_eq!(request(d, T_OUT, u64::MAX, &[rd(DATA, 512)]).0, S_IOERR);
    assert_eq!(request(d, T_IN, 0, &[wr(DATA, 100)]).0, S_IOERR);
    // Unknown request type.
    assert_eq!(request(d, 77, 0, &[]).0, S_UNSUPP);
    // Data in the wrong direction: IN with a device-readable buffer, OUT
    // with a device-writable one.
    assert_eq!(request(d, T_IN, 0, &[rd(DATA, 512)]).0, S_IOERR);
    assert_eq!(request(d, T_OUT, 0, &[wr(DATA, 512)]).0, S_IOERR);
    // A buffer beyond the end of guest memory.
    assert_eq!(request(d, T_IN, 0, &[wr(15 << 20, 2 << 20)]).0, S_IOERR);
    assert_eq!(request(d, T_IN, 0, &[wr(u64::MAX - 100, 512)]).0, S_IOERR);
    assert_still_works(d);
    assert_eq!(d.transport.device().handle().stats().errs, 9);
}

#[test]
fn malformed_chains_complete_without_status_and_do_not_wedge_the_queue() {
    let mut s = setup();
    let d = &mut s.driver;
    write_header(d, T_IN, 0);
    let q = &mut d.queues[0];
    // A loop: 0 -> 1 -> 0.
    q.write_desc(&d.mem, 0, HDR, 16, VIRTQ_DESC_F_NEXT, 1);
    q.write_desc(
        &d.mem,
        1,
        DATA,
        512,
        VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        0,
    );
    q.publish(&d.mem, 0);
    // A next index beyond the queue.
    q.write_desc(&d.mem, 2, HDR, 16, VIRTQ_DESC_F_NEXT, 500);
    q.publish(&d.mem, 2);
    // A head index beyond the queue.
    q.publish(&d.mem, 1000);
    // A header that is device-writable, and a status that is readable.
    q.write_desc(
        &d.mem,
        3,
        HDR,
        16,
        VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        4,
    );
    q.write_desc(&d.mem, 4, STATUS, 1, VIRTQ_DESC_F_WRITE, 0);
    q.publish(&d.mem, 3);
    q.write_desc(&d.mem, 5, HDR, 16, VIRTQ_DESC_F_NEXT, 6);
    q.write_desc(&d.mem, 6, STATUS, 1, 0, 0);
    q.publish(&d.mem, 5);
    // Only a header.
    q.write_desc(&d.mem, 7, HDR, 16, 0, 0);
    q.publish(&d.mem, 7);
    // A readable buffer after a writable one.
    q.write_desc(&d.mem, 8, HDR, 16, VIRTQ_DESC_F_NEXT, 9);
    q.write_desc(
        &d.mem,
        9,
        DATA,
        512,
        VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
        10,
    );
    q.write_desc(&d.mem, 10, DATA, 512, VIRTQ_DESC_F_NEXT, 11);
    q.write_desc(&d.mem, 11, STATUS, 1, VIRTQ_DESC_F_WRITE, 0);
    q.publish(&d.mem, 8);
    d.notify(0);
    let mut used = Vec::new();
    while used.len() < 6 {
        used.push(
            d.queues[0]
                .wait_used(&d.mem, Duration::from_secs(5))
                .expect("malformed chain not completed"),
        );
    }
    // The head beyond the queue cannot be named in the used ring at all.
    let lens: Vec<u32> = used.iter().map(|u| u.1).collect();
    // No status location for the loop, the bad next index, the readable
    // status and the header-only chain; the others got an error status.
    assert_eq!(lens, vec![0, 0, 1, 0, 0, 1]);
    d.queues[0].set_next_desc(16);
    assert_still_works(d);
}

#[test]
fn indirect_descriptors_are_followed() {
    let mut s = setup();
    let d = &mut s.driver;
    let table = DATA + 0x8_0000;
    let data = pattern(1024, 5);
    d.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    write_header(d, T_OUT, 20);
    let put = |mem: &devices::GuestMemory, i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let at = table + 16 * i;
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at + 14)).unwrap();
    };
    put(&d.mem, 0, HDR, 16, VIRTQ_DESC_F_NEXT, 1);
    put(&d.mem, 1, DATA, 1024, VIRTQ_DESC_F_NEXT, 2);
    put(&d.mem, 2, STATUS, 1, VIRTQ_DESC_F_WRITE, 0);
    let q = &mut d.queues[0];
    q.write_desc(&d.mem, 0, table, 48, 4, 0); // VIRTQ_DESC_F_INDIRECT
    q.publish(&d.mem, 0);
    d.notify(0);
    let used = d.queues[0]
        .wait_used(&d.mem, Duration::from_secs(5))
        .unwrap();
    assert_eq!(used, (0, 1));
    let mut on_disk = vec![0u8; 1024];
    s.disk.file.read_exact_at(&mut on_disk, 20 * 512).unwrap();
    assert_eq!(on_disk, data);

    // Hostile indirect tables: outside memory, a ragged length, a loop
    // inside the table. Each completes with nothing written.
    put(&d.mem, 0, HDR, 16, VIRTQ_DESC_F_NEXT, 1);
    put(&d.mem, 1, DATA, 1024, VIRTQ_DESC_F_NEXT, 0);
    let q = &mut d.queues[0];
    q.write_desc(&d.mem, 1, 0xffff_ffff_0000, 48, 4, 0);
    q.write_desc(&d.mem, 2, table, 40, 4, 0);
    q.write_desc(&d.mem, 3, table, 32, 4, 0);
    for head in 1..=3 {
        q.publish(&d.mem, head);
    }
    d.notify(0);
    for head in 1..=3 {
        assert_eq!(
            d.queues[0].wait_used(&d.mem, Duration::from_secs(5)),
            Some((head, 0))
        );
    }
    d.queues[0].set_next_desc(8);
    assert_still_works(d);
}

#[test]
fn ioeventfd_notification_is_served_like_a_register_write() {
    let mut s = setup();
    let d = &mut s.driver;
    write_header(d, T_IN, 0);
    let head = d.queues[0].add_chain(&d.mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    // What KVM does on the guest's write to QueueNotify.
    d.transport.queue_events()[0].write(1).unwrap();
    assert_eq!(
        d.queues[0].wait_used(&d.mem, Duration::from_secs(5)),
        Some((u32::from(head), 513))
    );
    assert_eq!(MmioTransport::<Block>::queue_notify_offset(), 0x50);
}

fn event_idx_driver() -> (Driver<Block>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(FileDisk::create(&dir.path().join("d"), DISK_SIZE));
    let mut d = Driver::new(Block::new(disk, BlockConfig::default()).unwrap());
    d.init(VIRTIO_F_VERSION_1 | FEATURE_EVENT_IDX, 1, 128);
    assert!(d.transport.acked_features() & FEATURE_EVENT_IDX != 0);
    (d, dir)
}

fn avail_event(d: &Driver<Block>) -> u16 {
    d.mem
        .read_obj(GuestAddress(d.queues[0].used + 4 + 8 * 128))
        .unwrap()
}

/// Waits until the device, gone idle, asks to be notified at `want`.
fn settles_at(d: &Driver<Block>, want: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if avail_event(d) == want {
            return true;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    false
}

#[test]
fn event_idx_suppresses_notifications_but_still_serves_requests() {
    let (mut d, _dir) = event_idx_driver();
    for i in 0..5 {
        assert_eq!(request(&mut d, T_IN, i, &[wr(DATA, 512)]).0, S_OK);
        // Once idle, the device asks to be notified at the next avail index.
        assert!(
            settles_at(&d, i as u16 + 1),
            "avail_event {}",
            avail_event(&d)
        );
    }
}

/// virtio 1.x 2.7.10: the driver notifies iff avail_event lies in [old, new).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[test]
fn requests_published_while_notifications_are_held_back_are_all_served() {
    let (mut d, _dir) = event_idx_driver();
    const DEPTH: u16 = 8;
    const TOTAL: u16 = 400;
    let (mut published, mut done, mut notified) = (0u16, 0u16, 0);
    while done < TOTAL {
        // Refill, notifying only where avail_event asks for it, so the
        // device must find requests it held notifications back for.
        let old = published;
        while published < TOTAL && published - done < DEPTH {
            let slot = u64::from(published % DEPTH);
            let (hdr, data, status) = (HDR + 16 * slot, DATA + 512 * slot, STATUS + slot);
            d.mem.write_obj(T_IN.to_le(), GuestAddress(hdr)).unwrap();
            d.mem
                .write_obj(u64::from(published).to_le(), GuestAddress(hdr + 8))
                .unwrap();
            d.mem.write_obj(0xffu8, GuestAddress(status)).unwrap();
            d.queues[0].set_next_desc((published % DEPTH) * 3);
            d.queues[0].add_chain(&d.mem, &[rd(hdr, 16), wr(data, 512), wr(status, 1)]);
            published += 1;
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        if published != old && need_event(avail_event(&d), published, old) {
            d.notify(0);
            notified += 1;
        }
        let (head, len) = d.queues[0]
            .wait_used(&d.mem, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("request {done} never completed ({notified} notifications)"));
        assert_eq!((head, len), (u32::from(done % DEPTH) * 3, 513));
        let status: u8 = d
            .mem
            .read_obj(GuestAddress(STATUS + u64::from(done % DEPTH)))
            .unwrap();
        assert_eq!(status, S_OK, "request {done}");
        done += 1;
    }
    assert!(settles_at(&d, TOTAL), "avail_event {}", avail_event(&d));
    eprintln!("{TOTAL} requests, {notified} notifications");
}

#[test]
fn reset_stops_the_device_and_it_can_start_again() {
    let mut s = setup();
    assert_still_works(&mut s.driver);
    s.driver.write_reg(0x70, 0);
    assert!(!s.driver.transport.is_active());
    assert_eq!(s.driver.read_reg(0x70), 0);
    assert_eq!(
        s.driver.read_reg(0x60),
        0,
        "interrupt status survives reset"
    );
    s.driver.write_reg(0x30, 0);
    assert_eq!(s.driver.read_reg(0x44), 0, "queue still ready after reset");
    s.driver.init(u64::MAX, 1, 64);
    assert_still_works(&mut s.driver);
}

#[test]
fn queue_outside_guest_memory_fails_activation_with_needs_reset() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(FileDisk::create(&dir.path().join("d"), DISK_SIZE));
    let mut d = Driver::new(Block::new(disk, BlockConfig::default()).unwrap());
    assert!(d.negotiate(VIRTIO_F_VERSION_1));
    d.write_reg(0x30, 0);
    d.write_reg(0x38, 128);
    d.write_reg(0x80, 0xfff0_0000);
    d.write_reg(0x84, 0x10);
    d.write_reg(0x44, 1);
    d.write_reg(0x70, 1 | 2 | 8 | 4);
    assert!(!d.transport.is_active());
    assert!(d.read_reg(0x70) & 64 != 0, "DEVICE_NEEDS_RESET not set");
    assert!(d.read_reg(0x60) & 2 != 0, "no config-change interrupt");
}

#[test]
fn odd_register_accesses_are_ignored() {
    let mut s = setup();
    let d = &mut s.driver;
    let mut two = [0xffu8; 2];
    d.transport.read(0x000, &mut two);
    assert_eq!(two, [0, 0]);
    d.transport.write(0x070, &[0]); // 1-byte status write: ignored
    assert!(d.transport.is_active());
    d.write_reg(0x30, 9); // nonexistent queue
    assert_eq!(d.read_reg(0x34), 0);
    d.write_reg(0x50, 9); // notify for nonexistent queue
    d.write_reg(0xe00, 1); // config space beyond its end
    let mut past = [0xffu8; 4];
    d.transport.read(0x100 + 4000, &mut past);
    assert_eq!(past, [0; 4]);
    // Queue registers are frozen after DRIVER_OK.
    d.write_reg(0x30, 0);
    d.write_reg(0x38, 2);
    assert_still_works(d);
}

fn throttled(read: LimiterConfig, write: LimiterConfig) -> Setup {
    setup_with(
        BlockConfig {
            read_limit: read,
            write_limit: write,
            ..BlockConfig::default()
        },
        false,
    )
}

fn bandwidth(bytes_per_s: u64) -> LimiterConfig {
    LimiterConfig {
        bandwidth: Some(BucketConfig::per_second(bytes_per_s, 0)),
        ops: None,
    }
}

#[test]
fn heavy_write_bandwidth_limit_holds() {
    let mut s = throttled(LimiterConfig::default(), bandwidth(1 << 20));
    let start = Instant::now();
    for i in 0..8 {
        assert_eq!(
            request(&mut s.driver, T_OUT, i * 512, &[rd(DATA, 256 << 10)]).0,
            S_OK
        );
    }
    // 2 MiB at 1 MiB/s, less the 0.1 s bucket that starts full.
    let took = start.elapsed().as_secs_f64();
    assert!((1.8..2.4).contains(&took), "2 MiB took {took:.2} s");
    // Reads are not limited.
    let start = Instant::now();
    assert_eq!(
        request(&mut s.driver, T_IN, 0, &[wr(DATA, 2 << 20)]).0,
        S_OK
    );
    assert!(start.elapsed() < Duration::from_millis(500));
}

#[test]
fn heavy_read_iops_limit_holds_and_runtime_change_takes_effect_at_once() {
    let ops = LimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig::per_second(50, 0)),
    };
    let mut s = throttled(ops, LimiterConfig::default());
    let start = Instant::now();
    for i in 0..30 {
        assert_eq!(request(&mut s.driver, T_IN, i, &[wr(DATA, 512)]).0, S_OK);
    }
    // 5 in the full bucket, 25 more at 50/s.
    let took = start.elapsed().as_secs_f64();
    assert!((0.45..0.75).contains(&took), "30 reads took {took:.2} s");

    // Nearly stop reads, queue one, then lift the limit: it completes at once.
    let handle = s.driver.transport.device().handle();
    let slow = LimiterConfig {
        bandwidth: None,
        ops: Some(BucketConfig {
            size: 1,
            one_time_burst: 0,
            refill_time_ms: 60_000,
        }),
    };
    handle.set_throttle(slow, LimiterConfig::default()).unwrap();
    assert_eq!(request(&mut s.driver, T_IN, 0, &[wr(DATA, 512)]).0, S_OK);
    let d = &mut s.driver;
    write_header(d, T_IN, 0);
    d.queues[0].add_chain(&d.mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    d.notify(0);
    assert!(
        d.queues[0]
            .wait_used(&d.mem, Duration::from_millis(300))
            .is_none(),
        "limit not applied"
    );
    let lifted = Instant::now();
    handle
        .set_throttle(LimiterConfig::default(), LimiterConfig::default())
        .unwrap();
    assert!(d.queues[0]
        .wait_used(&d.mem, Duration::from_secs(2))
        .is_some());
    assert!(
        lifted.elapsed() < Duration::from_millis(100),
        "runtime change took {:?}",
        lifted.elapsed()
    );
    assert_eq!(handle.throttle().0, LimiterConfig::default());
}

#[test]
fn save_and_restore_continue_the_same_queue() {
    let mut s = setup_with(
        BlockConfig {
            serial: Some("disk0".into()),
            write_limit: bandwidth(50 << 20),
            ..BlockConfig::default()
        },
        false,
    );
    assert_still_works(&mut s.driver);
    // A request made available but not notified before the save.
    let data = pattern(4096, 42);
    s.driver
        .mem
        .write_slice(&data, GuestAddress(DATA + 0x1_0000))
        .unwrap();
    let d = &mut s.driver;
    let transport_state = d.transport.save();
    write_header(d, T_OUT, 300);
    let head = d.queues[0].add_chain(
        &d.mem,
        &[rd(HDR, 16), rd(DATA + 0x1_0000, 4096), wr(STATUS, 1)],
    );
    let block_state = d.transport.device().save();

    // Through JSON, as a snapshot file or migration stream would carry it.
    let transport_json = serde_json::to_string(&transport_state).unwrap();
    let block_json = serde_json::to_string(&block_state).unwrap();
    let transport_state: MmioState = serde_json::from_str(&transport_json).unwrap();
    let block_state: BlockState = serde_json::from_str(&block_json).unwrap();
    assert_eq!(block_state.config.serial.as_deref(), Some("disk0"));
    assert_eq!(block_state.config.write_limit, bandwidth(50 << 20));

    let flushes = s.disk.flushes.load(Ordering::SeqCst);
    d.transport.device().flush_disk().unwrap();
    assert_eq!(s.disk.flushes.load(Ordering::SeqCst), flushes + 1);
    let block = Block::restore(s.disk.clone(), &block_state).unwrap();
    let mut restored =
        MmioTransport::restore(block, d.mem.clone(), d.irq.clone(), &transport_state).unwrap();
    assert!(!restored.is_active());
    restored.resume();
    assert!(restored.is_active());
    assert_eq!(restored.acked_features(), d.transport.acked_features());
    d.transport = restored;
    // The pending request completes without a new notification.
    assert_eq!(
        d.queues[0].wait_used(&d.mem, Duration::from_secs(5)),
        Some((u32::from(head), 1))
    );
    let mut on_disk = vec![0u8; 4096];
    s.disk.file.read_exact_at(&mut on_disk, 300 * 512).unwrap();
    assert_eq!(on_disk, data);
    assert_still_works(d);
}

#[test]
fn restore_rejects_mismatched_state() {
    let mut s = setup();
    let state = s.driver.transport.save();
    let block_state = s.driver.transport.device().save();
    let make = || {
        let disk = Arc::new(FileDisk::create(&s._dir.path().join("x"), DISK_SIZE));
        Block::new(disk, BlockConfig::default()).unwrap()
    };
    let mem = s.driver.mem.clone();
    let irq = s.driver.irq.clone();
    let bad_version = MmioState {
        version: 99,
        ..state.clone()
    };
    let err = MmioTransport::restore(make(), mem.clone(), irq.clone(), &bad_version)
        .err()
        .unwrap();
    assert!(err.to_string().contains("version 99"), "{err}");
    let bad_type = MmioState {
        device_type: 1,
        ..state.clone()
    };
    assert!(MmioTransport::restore(make(), mem.clone(), irq.clone(), &bad_type).is_err());
    let mut bad_queue = state.clone();
    bad_queue.queues[0].size = 3;
    let err = MmioTransport::restore(make(), mem, irq, &bad_queue)
        .err()
        .unwrap();
    assert!(err.to_string().contains("queue 0"), "{err}");
    let small = Arc::new(FileDisk::create(&s._dir.path().join("y"), DISK_SIZE / 2));
    let err = Block::restore(small, &block_state).err().unwrap();
    assert!(err.to_string().contains("sectors"), "{err}");
    let future = BlockState {
        version: 2,
        ..block_state
    };
    assert!(Block::restore(s.disk.clone(), &future).is_err());
}

#[test]
fn interrupt_line_can_be_set_after_placement_but_not_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Arc::new(FileDisk::create(&dir.path().join("d"), DISK_SIZE));
    let mut d = Driver::new(Block::new(disk, BlockConfig::default()).unwrap());
    let late = Arc::new(CountingIrq::default());
    assert!(d.transport.set_interrupt(late.clone()).is_ok());
    d.init(VIRTIO_F_VERSION_1, 1, 128);
    assert_eq!(request(&mut d, T_IN, 0, &[wr(DATA, 512)]).0, S_OK);
    assert_eq!(late.count(), 1);
    assert_eq!(d.irq.count(), 0, "the replaced line fired");
    assert!(d
        .transport
        .set_interrupt(Arc::new(CountingIrq::default()))
        .is_err());
    assert_eq!(d.read_reg(0x60) & 1, 1);
}

#[test]
fn transports_can_sit_on_a_shared_bus() {
    fn shared<T: BusDevice + Send + 'static>() {}
    shared::<MmioTransport<Block>>();
    shared::<MmioTransport<devices::virtio::net::Net>>();
    shared::<MmioTransport<devices::virtio::rng::Rng>>();
    fn handle<T: Send + Sync + Clone>() {}
    handle::<devices::virtio::block::BlockHandle>();
    handle::<devices::virtio::net::NetHandle>();
}

#[test]
fn queue_teardown_while_running_stops_the_device_until_reset() {
    let mut s = setup();
    assert_still_works(&mut s.driver);
    let d = &mut s.driver;
    // What virtio-drivers does when a queue is dropped.
    d.write_reg(0x30, 0);
    d.write_reg(0x44, 0);
    assert_eq!(d.read_reg(0x44), 0, "QueueReady does not read back 0");
    assert!(!d.transport.is_active());
    for reg in [0x38, 0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4] {
        d.write_reg(reg, 0);
    }
    // A request made now is not served: the rings may be gone.
    write_header(d, T_IN, 0);
    d.queues[0].add_chain(&d.mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)]);
    d.notify(0);
    assert!(d.queues[0]
        .wait_used(&d.mem, Duration::from_millis(100))
        .is_none());
    d.init(u64::MAX, 1, 128);
    assert_still_works(d);
}
