//! `blk`: sequential or random reads or writes on a virtio-blk disk, fio
//! style. `probe.mode=seqwrite|seqread|randwrite|randread`, `probe.mib`
//! MiB in `probe.bs`-byte requests (random modes issue as many requests at
//! uniformly random `bs`-aligned offsets within the first `mib` MiB),
//! `probe.seed`. Writes carry the fixed pattern of `blkpattern` (every
//! 8-byte word of sector N holds N ^ seed) and end with a flush, which is
//! timed. With `probe.verify=1` reads check that pattern and writes are
//! read back and checked afterwards (untimed).
//!
//! Requests are kept in flight as deep as the queue allows, so the device
//! sees batches and a notification (a VM exit) is skipped whenever the
//! device says it is still working through the ring (EVENT_IDX).

use super::Workload;
use crate::rt::fail::Fail;
use crate::rt::tsc::{self, Tsc};
use crate::rt::virtio::{self, ProbeHal};
use crate::{fail, say};
use oxvirt_probe::blkpattern::{self, SECTOR};
use oxvirt_probe::{bootinfo::BootInfo, params::Params};
use virtio_drivers::device::blk::{BlkReq, BlkResp, VirtIOBlk};
use virtio_drivers::transport::mmio::MmioTransport;
use virtio_drivers::transport::DeviceType;
use virtio_drivers::Error;

pub const WORKLOAD: Workload = Workload {
    name: "blk",
    keys: &["mode", "mib", "bs", "verify", "seed"],
    run,
};

const MIB: u64 = 1 << 20;
/// Requests in flight at most (the driver's ring has 16 descriptors).
const DEPTH: usize = 16;

type Disk = VirtIOBlk<ProbeHal, MmioTransport<'static>>;

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Read,
    Write,
}

struct Job {
    op: Op,
    random: bool,
    bytes: u64,
    bs: usize,
    seed: u64,
}

impl Job {
    fn requests(&self) -> u64 {
        self.bytes / self.bs as u64
    }

    /// The first sector of each request, in issue order (reproducible, so a
    /// random write can be read back).
    fn sectors(&self) -> impl Iterator<Item = u64> + use<> {
        let blocks = self.requests();
        let sectors_per_block = (self.bs / SECTOR) as u64;
        let random = self.random;
        let mut state = self.seed ^ 0x9e37_79b9_7f4a_7c15 | 1;
        (0..blocks).map(move |index| {
            let block = if random {
                // xorshift64*: uniform enough, and the same on every run.
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                state.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks
            } else {
                index
            };
            block * sectors_per_block
        })
    }
}

fn run(boot: &BootInfo, params: &Params) -> Result<(), Fail> {
    let (op, random) = match params.get("mode") {
        Some("seqwrite") => (Op::Write, false),
        Some("seqread") => (Op::Read, false),
        Some("randwrite") => (Op::Write, true),
        Some("randread") => (Op::Read, true),
        Some(other) => {
            return fail!("probe.mode={other} is not one of seqwrite seqread randwrite randread")
        }
        None => return fail!("blk: probe.mode=seqwrite|seqread|randwrite|randread is missing"),
    };
    let mib = params.u64("mib", 16, 1, 1 << 20)?;
    let bs = params.u64("bs", 4096, SECTOR as u64, 4 * MIB)?;
    let job = Job {
        op,
        random,
        bytes: mib * MIB,
        bs: bs as usize,
        seed: params.u64("seed", 0, 0, u64::MAX)?,
    };
    let verify = params.flag("verify")?;
    if !bs.is_multiple_of(SECTOR as u64) || !job.bytes.is_multiple_of(bs) {
        return fail!("probe.bs={bs} must be a multiple of 512 that divides probe.mib={mib} MiB");
    }
    let clock = Tsc::detect()?;
    virtio::init(boot);
    let mut disk = Disk::new(virtio::find(boot, DeviceType::Block)?)?;
    let sectors = job.bytes / SECTOR as u64;
    if sectors > disk.capacity() {
        return fail!(
            "blk: probe.mib={mib} needs {sectors} sectors, the disk has {}",
            disk.capacity()
        );
    }
    let depth = DEPTH.min(job.requests() as usize);
    let buffers = virtio::alloc(depth * job.bs)?;

    let start = tsc::now();
    let requests = transfer(&mut disk, &job, job.op, false, buffers)?;
    if job.op == Op::Write {
        disk.flush()
            .map_err(|err| Fail::new(format_args!("blk: flush failed: {err}")))?;
    }
    let seconds = clock.seconds(tsc::now().wrapping_sub(start));
    if verify {
        transfer(&mut disk, &job, Op::Read, true, buffers)?;
    }
    let mode = params.get("mode").unwrap_or_default();
    say!(
        "PROBE RESULT blk mode={mode} mib={mib} bs={bs} requests={requests} seconds={seconds:.6} mb_s={:.1} iops={:.0} verify={}",
        job.bytes as f64 / 1e6 / seconds,
        requests as f64 / seconds,
        if verify { "ok" } else { "off" }
    );
    Ok(())
}

/// One request slot: its buffer, header and status stay put while the
/// device owns them (from submit to completion).
struct Slot<'a> {
    buf: &'a mut [u8],
    req: BlkReq,
    resp: BlkResp,
    token: Option<u16>,
    sector: u64,
}

/// Runs every request of `job` as `op`, up to `buffers.len() / bs` at a
/// time; `check` verifies the pattern of what is read. Returns the count.
fn transfer(
    disk: &mut Disk,
    job: &Job,
    op: Op,
    check: bool,
    buffers: &mut [u8],
) -> Result<u64, Fail> {
    let mut slots: [Option<Slot>; DEPTH] = Default::default();
    for (slot, buf) in slots.iter_mut().zip(buffers.chunks_exact_mut(job.bs)) {
        *slot = Some(Slot {
            buf,
            req: BlkReq::default(),
            resp: BlkResp::default(),
            token: None,
            sector: 0,
        });
    }
    let mut sectors = job.sectors().peekable();
    let (mut in_flight, mut done) = (0usize, 0u64);
    loop {
        for slot in slots.iter_mut().flatten().filter(|s| s.token.is_none()) {
            let Some(&sector) = sectors.peek() else { break };
            match submit(disk, job, op, slot, sector) {
                Ok(()) => {}
                Err(Error::QueueFull) => break,
                Err(err) => return fail!("blk: submitting sector {sector}: {err}"),
            }
            sectors.next();
            in_flight += 1;
        }
        if in_flight == 0 {
            if let Some(sector) = sectors.peek() {
                return fail!(
                    "blk: the queue takes no request (sector {sector}) with none in flight"
                );
            }
            return Ok(done);
        }
        let token = wait_used(disk);
        let Some(slot) = slots.iter_mut().flatten().find(|s| s.token == Some(token)) else {
            return fail!("blk: the device completed descriptor {token}, which is not in flight");
        };
        complete(disk, op, slot).map_err(|err| {
            Fail::new(format_args!(
                "blk: {} of {} bytes at sector {} failed: {err}{}",
                if op == Op::Write { "write" } else { "read" },
                slot.buf.len(),
                slot.sector,
                if disk.readonly() {
                    " (the disk is read-only)"
                } else {
                    ""
                }
            ))
        })?;
        if check {
            blkpattern::check(slot.buf, slot.sector, job.seed).map_err(|m| {
                Fail::new(format_args!(
                    "blk verify: sector {} offset {} holds {:#x}, expected {:#x}",
                    m.sector, m.offset, m.found, m.expected
                ))
            })?;
        }
        in_flight -= 1;
        done += 1;
    }
}

fn submit(disk: &mut Disk, job: &Job, op: Op, slot: &mut Slot, sector: u64) -> Result<(), Error> {
    slot.sector = sector;
    // SAFETY (both arms): `slot`'s buffer, header and status live in
    // `transfer`'s slots, untouched until `complete` hands them back.
    let token = match op {
        Op::Write => {
            blkpattern::fill(slot.buf, sector, job.seed);
            unsafe {
                disk.write_blocks_nb(sector as usize, &mut slot.req, slot.buf, &mut slot.resp)
            }
        }
        Op::Read => unsafe {
            disk.read_blocks_nb(sector as usize, &mut slot.req, slot.buf, &mut slot.resp)
        },
    }?;
    slot.token = Some(token);
    Ok(())
}

fn complete(disk: &mut Disk, op: Op, slot: &mut Slot) -> Result<(), Error> {
    let token = slot.token.take().unwrap_or_default();
    // SAFETY: the same buffers `submit` passed with this token.
    match op {
        Op::Write => unsafe {
            disk.complete_write_blocks(token, &slot.req, slot.buf, &mut slot.resp)
        },
        Op::Read => unsafe {
            disk.complete_read_blocks(token, &slot.req, slot.buf, &mut slot.resp)
        },
    }
}

/// Polls the used ring (interrupts are off) for the next completion.
fn wait_used(disk: &mut Disk) -> u16 {
    loop {
        if let Some(token) = disk.peek_used() {
            return token;
        }
        crate::rt::io::pause();
    }
}
