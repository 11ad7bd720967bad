//! virsh's `attach-disk` and `detach-disk`: one API call each. The VMM has
//! no disk hotplug, so only `--config` changes succeed (the daemon says so).

use daemon::devices::Disk;
use daemon::disk_attach::AttachDisk;

use super::{wait, Dom, ModifyArgs};

#[derive(clap::Args)]
pub struct AttachDiskArgs {
    #[command(flatten)]
    dom: Dom,
    /// An image file or block device (absolute path), or a volume: POOL/NAME.
    source: String,
    /// The guest's name for it: the next free one (vdb after vda).
    target: Option<String>,
    /// The image's format: raw or qcow2 (virsh's spelling).
    #[arg(long, value_name = "FORMAT")]
    subdriver: Option<String>,
    /// readonly: the guest cannot write it.
    #[arg(long)]
    mode: Option<String>,
    /// none, writeback, writethrough or unsafe.
    #[arg(long)]
    cache: Option<String>,
    /// What the guest reads as the disk's serial (up to 20 bytes).
    #[arg(long)]
    serial: Option<String>,
    #[command(flatten)]
    modify: ModifyArgs,
}

#[derive(clap::Args)]
pub struct DetachDiskArgs {
    #[command(flatten)]
    dom: Dom,
    /// vda, vdb, ... or the disk's path.
    target: String,
    #[command(flatten)]
    modify: ModifyArgs,
}

#[derive(clap::Subcommand)]
pub enum DiskVerb {
    /// Add a disk to a domain (--config: at its next start; no hotplug).
    #[command(name = "attach-disk")]
    Attach(AttachDiskArgs),
    /// Remove a disk from a domain (--config: at its next start).
    #[command(name = "detach-disk")]
    Detach(DetachDiskArgs),
}

pub fn run(verb: DiskVerb) -> anyhow::Result<()> {
    match verb {
        DiskVerb::Attach(a) => {
            let request = AttachDisk {
                disk: disk(&a)?,
                target: a.target.clone(),
            };
            let client = a.dom.connect.client()?;
            wait(client.attach_disk(&a.dom.domain, &request, a.modify.modify()))?;
            println!("Disk attached successfully");
        }
        DiskVerb::Detach(a) => {
            let client = a.dom.connect.client()?;
            wait(client.detach_disk(&a.dom.domain, &a.target, a.modify.modify()))?;
            println!("Disk detached successfully");
        }
    }
    Ok(())
}

/// The source as a path (absolute) or a volume (`POOL/NAME`).
fn disk(a: &AttachDiskArgs) -> anyhow::Result<Disk> {
    let readonly = match a.mode.as_deref() {
        None => false,
        Some("readonly") => true,
        Some(other) => anyhow::bail!("--mode {other}: expected readonly"),
    };
    let (path, volume) = match a.source.starts_with('/') {
        true => (a.source.clone().into(), None),
        false => (std::path::PathBuf::new(), Some(a.source.clone())),
    };
    Ok(Disk {
        path,
        volume,
        format: a.subdriver.clone(),
        readonly,
        cache: a.cache.clone(),
        serial: a.serial.clone(),
        ..Disk::default()
    })
}
