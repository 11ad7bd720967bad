//! `oxvirt cloud-localds`: cloud-image-utils' `cloud-localds`, making a
//! cloud-init NoCloud seed (an ISO 9660 volume labelled `cidata`).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use diskimg::iso9660::nocloud::{self, SeedSources};
use diskimg::iso9660::IsoFile;

#[derive(clap::Args)]
pub struct Args {
    /// Disk format of OUTPUT (only raw: the seed is the ISO image itself).
    #[arg(short = 'd', long = "disk-format", default_value = "raw")]
    disk_format: String,
    /// Filesystem of the seed (iso9660, or iso).
    #[arg(short = 'f', long = "filesystem", default_value = "iso9660")]
    filesystem: String,
    /// local-hostname in the generated meta-data.
    #[arg(short = 'H', long = "hostname")]
    hostname: Option<String>,
    /// dsmode in the generated meta-data (local or net).
    #[arg(short = 'm', long = "dsmode")]
    dsmode: Option<String>,
    /// network-config file (cloud-init network configuration v1 or v2).
    #[arg(short = 'N', long = "network-config", value_name = "FILE")]
    network_config: Option<PathBuf>,
    /// vendor-data file.
    #[arg(short = 'V', long = "vendor-data", value_name = "FILE")]
    vendor_data: Option<PathBuf>,
    /// The seed image to write (replaced whole, or left as it was).
    output: PathBuf,
    /// user-data file; `-` reads standard input.
    user_data: PathBuf,
    /// meta-data file; without it: {"instance-id": "iid-local01"}.
    meta_data: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    if args.meta_data.is_some() && (args.hostname.is_some() || args.dsmode.is_some()) {
        bail!("a meta-data file is incompatible with --hostname and --dsmode");
    }
    if !matches!(args.filesystem.as_str(), "iso9660" | "iso") {
        bail!(
            "--filesystem {}: only iso9660 is supported",
            args.filesystem
        );
    }
    if args.disk_format != "raw" {
        bail!(
            "--disk-format {}: only raw is supported (convert with `oxvirt img convert`)",
            args.disk_format
        );
    }
    if let Some(mode) = args
        .dsmode
        .as_deref()
        .filter(|m| !["local", "net"].contains(m))
    {
        bail!("--dsmode {mode}: expected local or net");
    }
    let from_stdin = args.user_data.as_os_str() == "-";
    let sources = SeedSources {
        user_data: (!from_stdin).then_some(args.user_data.as_path()),
        meta_data: args.meta_data.as_deref(),
        network_config: args.network_config.as_deref(),
        vendor_data: args.vendor_data.as_deref(),
    };
    let default_meta = nocloud::default_meta_data(
        nocloud::DEFAULT_INSTANCE_ID,
        args.hostname.as_deref(),
        args.dsmode.as_deref(),
    );
    let mut files = sources.read(default_meta)?;
    if from_stdin {
        files[0] = IsoFile::read_from(nocloud::USER_DATA, std::io::stdin().lock(), "-")?;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    nocloud::seed_image(files, now)
        .write(&args.output)
        .with_context(|| format!("writing the seed {}", args.output.display()))?;
    Ok(0)
}
