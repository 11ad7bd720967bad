//! `oxvirt vmm`: runs one VM in the foreground (see docs/vmm.md).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use vmm::config::{Settings, SizeSetting};
use vmm::device_config::DeviceSetting;

#[derive(clap::Args)]
pub struct Args {
    /// Kernel: a bzImage, or an ELF with a PVH entry note (vmlinux, the probe guest).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: console=ttyS0).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest RAM: 512M, 2G, or a number of MiB (default 128M).
    #[arg(long)]
    memory: Option<String>,
    /// Number of vCPUs (default 1).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Serial console: stdio, file:PATH or unix:PATH (default stdio).
    #[arg(long)]
    serial: Option<String>,
    /// Control socket path (JSON lines, QMP-style).
    #[arg(long)]
    api: Option<PathBuf>,
    /// CPUID profile: host (default) or pvm-compat.
    #[arg(long, value_name = "host|pvm-compat")]
    cpu_profile: Option<String>,
    /// A virtio disk (repeatable): path=FILE[,format=raw|qcow2][,readonly=on]
    /// [,cache=none|writeback|writethrough|unsafe][,serial=ID][,id=NAME]
    /// [,bps=N][,iops=N][,read_bps=N][,write_bps=N][,read_iops=N][,write_iops=N][,burst=N]
    #[arg(long, value_name = "path=FILE,...")]
    disk: Vec<String>,
    /// A virtio NIC over a tap (repeatable): tap=NAME[,mac=MAC][,id=NAME][,bps=N][,pps=N]
    #[arg(long, value_name = "tap=NAME,...")]
    net: Vec<String>,
    /// A virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// Wait for a migration stream instead of booting: tcp:HOST:PORT,
    /// unix:PATH, exec:COMMAND, fd:N or file:PATH (same devices as the source).
    #[arg(long, value_name = "URI")]
    incoming: Option<String>,
    /// Keep the vCPUs stopped after boot set-up or an incoming migration
    /// until `cont` on the control socket (QEMU's -S).
    #[arg(short = 'S', long)]
    paused: bool,
    /// The same settings in a TOML file (or JSON, for a .json name); flags win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// `oxvirt vmm` on its own: the subcommand's flags with nothing else.
#[derive(Parser)]
#[command(
    name = "oxvirt vmm",
    about = "KVM virtual machine monitor: one VM in the foreground."
)]
struct Alone {
    #[command(flatten)]
    args: Args,
}

/// The flags of `oxvirt vmm ...` when `vmm` is the first argument, parsed
/// by a parser of its own. The VMM lives as long as its VM, and building
/// every tool's parser first would leave their code and heap resident for
/// that whole time (docs/benchmarks.md, VMM memory).
pub fn args_alone() -> Option<Args> {
    let mut argv = std::env::args_os().skip(1);
    if argv.next()? != "vmm" {
        return None;
    }
    let argv = std::iter::once(OsString::from("oxvirt vmm")).chain(argv);
    Some(Alone::parse_from(argv).args)
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    // Logs go to stderr: warnings by default, OXVIRT_LOG or RUST_LOG (a
    // `tracing` filter such as `vmm=debug`) for more.
    let filter = tracing_subscriber::EnvFilter::try_from_env("OXVIRT_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let from_file = match &args.config {
        Some(path) => Settings::from_file(path)?,
        None => Settings::default(),
    };
    let flags = Settings {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        memory: args.memory.map(SizeSetting::Text),
        vcpus: args.vcpus,
        serial: args.serial,
        api: args.api,
        cpu_profile: args.cpu_profile,
        disk: given(args.disk),
        net: given(args.net),
        rng: args.rng.then_some(true),
        incoming: args.incoming,
        paused: args.paused.then_some(true),
    };
    let config = from_file.overridden_by(flags).into_config()?;
    let exit = vmm::run(&config).context("vmm")?;
    Ok(exit.status())
}

/// Repeated flags as a setting: none given leaves the config file's.
fn given(values: Vec<String>) -> Option<Vec<DeviceSetting>> {
    (!values.is_empty()).then(|| values.into_iter().map(DeviceSetting::Text).collect())
}
