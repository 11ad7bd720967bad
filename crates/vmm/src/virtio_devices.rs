//! The VM's virtio devices (disks, NICs, rng): opened from the
//! configuration, placed by the device manager, and described and tuned
//! through the control API (`query-block`, `block_set_io_throttle`,
//! `query-net`, `net_set_throttle`, `set_link`).

use std::sync::{Arc, Mutex, MutexGuard};

use devices::rate_limiter::LimiterConfig;
use devices::virtio::block::{Block, BlockError, BlockHandle, CacheMode};
use devices::virtio::net::{Net, NetError, NetHandle, Tap, TapConfig};
use devices::virtio::rng::{Rng, RngError};
use devices::virtio::{MmioState, MmioTransport, TransportError, VirtioDevice};
use devices::GuestMemory;
use diskimg::{BlockDevice, Format};
use kvm_ioctls::VmFd;
use serde_json::{json, Value};

use crate::device_config::{DiskConfig, NicConfig};
use crate::device_manager::{DeviceError, DeviceManager};

/// Errors opening or placing a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("--disk {id}: {source}")]
    Image { id: String, source: diskimg::Error },
    #[error("--disk {id}: {source}")]
    Block { id: String, source: BlockError },
    #[error("--net {id}: {source}")]
    Net { id: String, source: NetError },
    #[error("--rng: {0}")]
    Rng(#[from] RngError),
    #[error(transparent)]
    Place(#[from] DeviceError),
}

/// A bad control-API request about a device (QMP's GenericError or
/// DeviceNotFound).
#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error("Device '{0}' not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
}

/// A virtio-mmio transport whatever its device: what reset, pause and
/// resume need.
pub trait VirtioSlot: Send {
    fn reset(&mut self);
    fn pause(&mut self);
    fn resume(&mut self);
    /// Stops the worker and returns the transport's state.
    fn save(&mut self) -> MmioState;
    /// Loads a saved state into the stopped transport.
    fn load_state(&mut self, state: &MmioState) -> Result<(), TransportError>;
}

impl<D: VirtioDevice> VirtioSlot for MmioTransport<D> {
    fn reset(&mut self) {
        MmioTransport::reset(self);
    }
    fn pause(&mut self) {
        MmioTransport::pause(self);
    }
    fn resume(&mut self) {
        MmioTransport::resume(self);
    }
    fn save(&mut self) -> MmioState {
        MmioTransport::save(self)
    }
    fn load_state(&mut self, state: &MmioState) -> Result<(), TransportError> {
        MmioTransport::load_state(self, state)
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct AttachedDisk {
    config: DiskConfig,
    format: Format,
    backing: Option<String>,
    read_only: bool,
    handle: BlockHandle,
    transport: Arc<Mutex<MmioTransport<Block>>>,
}

struct AttachedNic {
    config: NicConfig,
    handle: NetHandle,
    transport: Arc<Mutex<MmioTransport<Net>>>,
}

/// Every virtio device of the VM.
#[derive(Default)]
pub struct VirtioDevices {
    disks: Vec<AttachedDisk>,
    nics: Vec<AttachedNic>,
    slots: Vec<Arc<Mutex<dyn VirtioSlot>>>,
}

impl VirtioDevices {
    /// Opens every disk and tap and places the devices: disks first, then
    /// NICs, then the rng, so the guest sees a stable order.
    pub fn attach(
        disks: &[DiskConfig],
        nics: &[NicConfig],
        rng: bool,
        vm: &VmFd,
        mem: &GuestMemory,
        manager: &mut DeviceManager,
    ) -> Result<Self, VirtioError> {
        let mut all = VirtioDevices::default();
        for config in disks {
            let (info, block) = open_disk(config)?;
            let transport = manager.add_virtio(vm, mem, block)?;
            all.slots.push(transport.clone());
            all.disks.push(AttachedDisk::new(config, info, transport));
        }
        for config in nics {
            let net_err = |source| VirtioError::Net {
                id: config.id.clone(),
                source,
            };
            let tap = Tap::create(&TapConfig {
                name: &config.tap,
                ..TapConfig::default()
            })
            .map_err(|e| net_err(e.into()))?;
            let net = Net::new(tap, config.net.clone()).map_err(net_err)?;
            let handle = net.handle();
            let transport = manager.add_virtio(vm, mem, net)?;
            all.slots.push(transport.clone());
            all.nics.push(AttachedNic {
                config: config.clone(),
                handle,
                transport,
            });
        }
        if rng {
            let transport = manager.add_virtio(vm, mem, Rng::new(LimiterConfig::default())?)?;
            all.slots.push(transport);
        }
        Ok(all)
    }

    /// Every transport, for reset, pause and resume.
    pub fn slots(&self) -> impl Iterator<Item = MutexGuard<'_, dyn VirtioSlot + 'static>> {
        self.slots.iter().map(|s| lock(s))
    }

    /// Makes everything the guest wrote durable on every disk, whatever
    /// the cache mode (before another host opens the images).
    pub fn flush_disks(&self) -> Result<(), String> {
        for disk in &self.disks {
            (lock(&disk.transport).device().flush_disk())
                .map_err(|e| format!("flushing {}: {e}", disk.config.id))?;
        }
        Ok(())
    }

    /// Opens every disk image again (a migration's destination, after the
    /// stream: the source flushed what the guest wrote there).
    pub fn reopen_disks(&self) -> Result<(), VirtioError> {
        for disk in &self.disks {
            let (_, image) = open_image(&disk.config)?;
            (lock(&disk.transport).device_mut().replace_disk(image)).map_err(|source| {
                VirtioError::Block {
                    id: disk.config.id.clone(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// QMP's `query-block`.
    pub fn query_block(&self) -> Value {
        Value::Array(self.disks.iter().map(AttachedDisk::describe).collect())
    }

    /// QMP's `query-blockstats` (plus `errors`, as virsh domblkstat's errs).
    pub fn query_blockstats(&self) -> Value {
        let stats = self.disks.iter().map(|d| {
            let s = d.handle.stats();
            json!({"device": d.config.id, "stats": {
                "rd_bytes": s.rd_bytes, "wr_bytes": s.wr_bytes,
                "rd_operations": s.rd_req, "wr_operations": s.wr_req,
                "flush_operations": s.flush_operations,
                "rd_total_time_ns": s.rd_total_times, "wr_total_time_ns": s.wr_total_times,
                "flush_total_time_ns": s.flush_total_times,
                "errors": s.errs,
            }})
        });
        Value::Array(stats.collect())
    }

    /// QMP's `block_set_io_throttle`: `bps`/`iops` limit each direction,
    /// `bps_rd`/`bps_wr`/`iops_rd`/`iops_wr` one; 0 is unlimited.
    pub fn set_block_throttle(&self, args: &Value) -> Result<(), TuneError> {
        let id = device_arg(args)?;
        let disk = (self.disks.iter().find(|d| d.config.id == id))
            .ok_or_else(|| TuneError::NotFound(id.to_owned()))?;
        let (read_bps, write_bps) = directional(args, "bps", "bps_rd", "bps_wr")?;
        let (read_iops, write_iops) = directional(args, "iops", "iops_rd", "iops_wr")?;
        disk.handle
            .set_throttle(
                LimiterConfig::per_second(read_bps, read_iops, 0),
                LimiterConfig::per_second(write_bps, write_iops, 0),
            )
            .map_err(|e| TuneError::Invalid(e.to_string()))
    }

    /// Our `query-net`: each NIC, its tap, link, counters and limits.
    pub fn query_net(&self) -> Value {
        let nics = self.nics.iter().map(|n| {
            let s = n.handle.stats();
            let (rx, _) = n.handle.throttle();
            json!({
                "name": n.config.id, "ifname": n.config.tap,
                "mac": n.config.net.mac.to_string(),
                "link": lock(&n.transport).device().link_up(),
                "rx_bytes": s.rx_bytes, "rx_packets": s.rx_packets, "rx_dropped": s.rx_dropped,
                "tx_bytes": s.tx_bytes, "tx_packets": s.tx_packets, "tx_dropped": s.tx_dropped,
                "errors": s.errors,
                "bps": rate(rx.bandwidth), "pps": rate(rx.ops),
            })
        });
        Value::Array(nics.collect())
    }

    /// Our `net_set_throttle {"device", "bps", "pps"}` (each direction; 0 unlimited).
    pub fn set_net_throttle(&self, args: &Value) -> Result<(), TuneError> {
        let nic = self.nic(device_arg(args)?)?;
        let limit = LimiterConfig::per_second(number(args, "bps")?, number(args, "pps")?, 0);
        nic.handle
            .set_throttle(limit, limit)
            .map_err(|e| TuneError::Invalid(e.to_string()))
    }

    /// QMP's `set_link {"name", "up"}`: the guest sees the link change.
    pub fn set_link(&self, args: &Value) -> Result<(), TuneError> {
        let name = (args.get("name").and_then(Value::as_str))
            .ok_or_else(|| TuneError::Invalid("Parameter 'name' is missing".into()))?;
        let up = (args.get("up").and_then(Value::as_bool)).ok_or_else(|| {
            TuneError::Invalid("Parameter 'up' is missing or not a boolean".into())
        })?;
        let nic = self.nic(name)?;
        lock(&nic.transport).update_config(|net| net.set_link_up(up));
        Ok(())
    }

    fn nic(&self, id: &str) -> Result<&AttachedNic, TuneError> {
        (self.nics.iter().find(|n| n.config.id == id))
            .ok_or_else(|| TuneError::NotFound(id.to_owned()))
    }
}

/// What `query-block` shows of an image besides the device's own view.
struct ImageFacts {
    format: Format,
    backing: Option<String>,
}

fn open_disk(config: &DiskConfig) -> Result<(ImageFacts, Block), VirtioError> {
    let (facts, image) = open_image(config)?;
    let mut block =
        Block::new(image, config.block.clone()).map_err(|source| VirtioError::Block {
            id: config.id.clone(),
            source,
        })?;
    // A second descriptor of the image, only to start its writeback early.
    match std::fs::File::open(&config.path) {
        Ok(file) => block.set_write_behind(file),
        Err(e) => tracing::warn!("disk {}: no write-behind: {e}", config.id),
    }
    Ok((facts, block))
}

fn open_image(config: &DiskConfig) -> Result<(ImageFacts, Arc<dyn BlockDevice>), VirtioError> {
    let id = config.id.clone();
    let image_err = |source| VirtioError::Image {
        id: id.clone(),
        source,
    };
    let info = diskimg::ops::info::info(&config.path, config.format).map_err(image_err)?;
    let format: Format = info.format.parse().map_err(image_err)?;
    let options = diskimg::OpenOptions {
        read_only: config.block.read_only,
        format: Some(format),
        direct: config.block.cache.direct_io(),
    };
    let image = diskimg::open_with(&config.path, &options).map_err(image_err)?;
    let facts = ImageFacts {
        format,
        backing: info.backing_filename,
    };
    Ok((facts, Arc::from(image)))
}

impl AttachedDisk {
    fn new(
        config: &DiskConfig,
        facts: ImageFacts,
        transport: Arc<Mutex<MmioTransport<Block>>>,
    ) -> Self {
        let (read_only, handle) = {
            let t = lock(&transport);
            (t.device().read_only(), t.device().handle())
        };
        AttachedDisk {
            config: config.clone(),
            format: facts.format,
            backing: facts.backing,
            read_only,
            handle,
            transport,
        }
    }

    fn describe(&self) -> Value {
        let (read, write) = self.handle.throttle();
        let (bps, bps_rd, bps_wr) = split_total(rate(read.bandwidth), rate(write.bandwidth));
        let (iops, iops_rd, iops_wr) = split_total(rate(read.ops), rate(write.ops));
        let cache = self.config.block.cache;
        json!({
            "device": self.config.id, "locked": false, "removable": false, "type": "unknown",
            "inserted": {
                "file": self.config.path, "drv": self.format.name(), "ro": self.read_only,
                "backing_file": self.backing, "encrypted": false,
                "serial": self.config.block.serial,
                "cache": {
                    "writeback": cache != CacheMode::Writethrough,
                    "direct": cache.direct_io(),
                    "no-flush": cache == CacheMode::Unsafe,
                },
                "bps": bps, "bps_rd": bps_rd, "bps_wr": bps_wr,
                "iops": iops, "iops_rd": iops_rd, "iops_wr": iops_wr,
            },
        })
    }
}

/// A bucket's rate per second, 0 for unlimited (QMP's convention).
fn rate(bucket: Option<devices::rate_limiter::BucketConfig>) -> u64 {
    bucket.map_or(0, |b| b.rate_per_second())
}

/// QMP shows equal read and write limits as one total.
fn split_total(read: u64, write: u64) -> (u64, u64, u64) {
    if read == write {
        (read, 0, 0)
    } else {
        (0, read, write)
    }
}

fn device_arg(args: &Value) -> Result<&str, TuneError> {
    (args.get("device").or_else(|| args.get("id")))
        .and_then(Value::as_str)
        .ok_or_else(|| TuneError::Invalid("Parameter 'device' is missing".into()))
}

/// A non-negative integer argument; absent or 0 means unlimited.
fn number(args: &Value, key: &str) -> Result<Option<u64>, TuneError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(0) => Ok(None),
            Some(n) => Ok(Some(n)),
            None => Err(TuneError::Invalid(format!(
                "Parameter '{key}' expects a non-negative integer"
            ))),
        },
    }
}

/// (read, write) limits from a total and per-direction arguments; QEMU
/// refuses a total together with a direction.
fn directional(
    args: &Value,
    total: &str,
    read: &str,
    write: &str,
) -> Result<(Option<u64>, Option<u64>), TuneError> {
    let (t, r, w) = (
        number(args, total)?,
        number(args, read)?,
        number(args, write)?,
    );
    if t.is_some() && (r.is_some() || w.is_some()) {
        return Err(TuneError::Invalid(format!(
            "{total} and {read}/{write} cannot be used at the same time"
        )));
    }
    Ok((t.or(r), t.or(w)))
}
