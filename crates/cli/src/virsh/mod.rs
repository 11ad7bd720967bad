//! The virsh-like verbs (`oxvirt list`, `oxvirt start DOM`, ...) and
//! `oxvirt run`: each one API call to oxvirtd, then printing.

mod console;
mod disk;
mod net;
mod pool;
mod print;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use daemon::blkio::BlkioTune;
use daemon::client::{block_on, Client};
use daemon::devices::DiskThrottle;
use daemon::migrate::{MigrateParameters, MigrateRequest};
use daemon::paths::{Mode, Paths};
use daemon::remote::{ConnectUri, Token};
use daemon::run_spec::RunSpec;
use daemon::settings::{Modify, Sizing, VcpuPin};
use daemon::tune::{MemTune, SchedInfo};

/// Which daemon to talk to.
#[derive(clap::Args, Clone)]
pub struct Connect {
    /// oxvirt:///system, oxvirt:///session, a socket path,
    /// oxvirt+tcp://HOST:PORT/system or oxvirt+tls://HOST:PORT/system
    /// (default: $OXVIRT_DEFAULT_CONNECT_URI, else system for root, session otherwise).
    #[arg(short = 'c', long = "connect", value_name = "URI")]
    uri: Option<String>,
    /// The remote daemon's token (default: $OXVIRT_TOKEN_FILE, else the token in $OXVIRT_TOKEN).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The CA certificate an oxvirt+tls:// daemon's certificate must be signed by (default: $OXVIRT_CA_FILE).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
}

/// virsh takes `-c URI`/`--connect URI` before the verb (`virsh -c
/// qemu:///system list`); ours is an option of each verb, so a leading one
/// moves to just after the verb. Other arguments are left as they are.
pub fn connect_after_verb(mut args: Vec<OsString>) -> Vec<OsString> {
    let Some(first) = args.get(1).and_then(|a| a.to_str()) else {
        return args;
    };
    let taken = match first {
        "-c" | "--connect" if args.len() > 3 => 2,
        _ if first.starts_with("--connect=") && args.len() > 2 => 1,
        _ => return args,
    };
    let connect: Vec<OsString> = args.drain(1..1 + taken).collect();
    args.splice(2..2, connect);
    args
}

impl Connect {
    fn client(&self) -> anyhow::Result<Client> {
        let uri = self
            .uri
            .clone()
            .or_else(|| env("OXVIRT_DEFAULT_CONNECT_URI"));
        let uri = match uri {
            Some(uri) => ConnectUri::parse(&uri)?,
            None => ConnectUri::Unix(Paths::for_mode(Mode::for_current_user())?.socket()),
        };
        let token = match uri.remote() {
            Some(_) => self.token()?,
            None => None,
        };
        let tls = matches!(uri, ConnectUri::Tls { .. });
        let client = Client::for_uri(uri, token);
        match (tls, self.ca_file()) {
            (true, Some(ca)) => Ok(client.with_ca_file(&ca)?),
            (true, None) => anyhow::bail!("oxvirt+tls:// needs --ca-file or $OXVIRT_CA_FILE"),
            (false, _) => Ok(client),
        }
    }

    /// The CA file for TLS: --ca-file, $OXVIRT_CA_FILE.
    fn ca_file(&self) -> Option<PathBuf> {
        self.ca_file
            .clone()
            .or_else(|| env("OXVIRT_CA_FILE").map(PathBuf::from))
    }

    /// The token for a TCP daemon: --token-file, $OXVIRT_TOKEN_FILE, $OXVIRT_TOKEN.
    fn token(&self) -> anyhow::Result<Option<Token>> {
        if let Some(file) = self
            .token_file
            .clone()
            .or_else(|| env("OXVIRT_TOKEN_FILE").map(PathBuf::from))
        {
            return Ok(Some(Token::read(&file)?));
        }
        env("OXVIRT_TOKEN")
            .map(|text| Token::from_text(&text).map_err(|e| anyhow::anyhow!("$OXVIRT_TOKEN: {e}")))
            .transpose()
    }
}

/// A set, non-empty environment variable.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[derive(clap::Args)]
pub struct Dom {
    #[command(flatten)]
    connect: Connect,
    /// Domain name.
    domain: String,
}

#[derive(clap::Args)]
pub struct StartArgs {
    #[command(flatten)]
    dom: Dom,
    /// Attach to the console right after the start.
    #[arg(long)]
    console: bool,
}

#[derive(clap::Args)]
pub struct DefineArgs {
    #[command(flatten)]
    connect: Connect,
    /// The domain's TOML definition.
    file: PathBuf,
}

#[derive(clap::Args)]
pub struct UndefineArgs {
    #[command(flatten)]
    dom: Dom,
    /// Undefine a running domain too (it keeps running, as a transient domain).
    #[arg(long)]
    force: bool,
    /// Forget the domain's snapshot metadata too (its disks keep the snapshots).
    #[arg(long)]
    snapshots_metadata: bool,
}

#[derive(clap::Args)]
pub struct SnapshotCreateArgs {
    #[command(flatten)]
    dom: Dom,
    /// Snapshot name.
    name: String,
    /// Free text kept with the snapshot.
    description: Option<String>,
}

#[derive(clap::Args)]
pub struct SaveArgs {
    #[command(flatten)]
    dom: Dom,
    /// Where the state goes (the definition goes beside it, FILE.domain.toml).
    file: PathBuf,
}

#[derive(clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    connect: Connect,
    /// A state file written by save.
    file: PathBuf,
}

#[derive(clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    dom: Dom,
    /// The destination oxvirtd: oxvirt+tcp://HOST:PORT/system (another
    /// host), or oxvirt:///system, oxvirt:///session, a socket path (this one).
    desturi: String,
    /// Live migration (the only kind: the guest runs while its memory moves).
    #[arg(long)]
    live: bool,
    /// Define the domain on the destination too.
    #[arg(long)]
    persistent: bool,
    /// Undefine the domain here once it runs at the destination.
    #[arg(long)]
    undefinesource: bool,
    /// The destination's token (default: the --connect token's sources:
    /// --token-file, $OXVIRT_TOKEN_FILE, $OXVIRT_TOKEN).
    #[arg(long, value_name = "FILE")]
    dest_token_file: Option<PathBuf>,
    /// The CA of an oxvirt+tls:// destination (default: --ca-file, $OXVIRT_CA_FILE).
    #[arg(long, value_name = "FILE")]
    dest_ca_file: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct SetspeedArgs {
    #[command(flatten)]
    dom: Dom,
    /// MiB/s.
    bandwidth: u64,
}

#[derive(clap::Args)]
pub struct SetdowntimeArgs {
    #[command(flatten)]
    dom: Dom,
    /// Milliseconds.
    downtime: u64,
}

#[derive(clap::Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    dom: Dom,
    /// Snapshot name.
    name: String,
}

#[derive(clap::Args)]
pub struct ShutdownArgs {
    #[command(flatten)]
    dom: Dom,
    /// Seconds the guest gets to power off before the VMM is told to quit.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    connect: Connect,
    /// Inactive domains too.
    #[arg(long)]
    all: bool,
    /// Names only, one per line.
    #[arg(long)]
    name: bool,
}

#[derive(clap::Args)]
pub struct DomstateArgs {
    #[command(flatten)]
    dom: Dom,
    /// Also say why.
    #[arg(long)]
    reason: bool,
}

#[derive(clap::Args)]
pub struct AutostartArgs {
    #[command(flatten)]
    dom: Dom,
    #[arg(long)]
    disable: bool,
}

#[derive(clap::Args, Clone, Copy)]
pub struct ModifyArgs {
    /// Change the running domain.
    #[arg(long)]
    live: bool,
    /// Change the definition.
    #[arg(long)]
    config: bool,
    /// Both (same as --live --config).
    #[arg(long)]
    current: bool,
}

impl ModifyArgs {
    fn modify(self) -> Modify {
        Modify {
            live: self.live || self.current,
            config: self.config || self.current,
        }
    }
}

#[derive(clap::Args)]
pub struct SchedinfoArgs {
    #[command(flatten)]
    dom: Dom,
    /// cpu_shares=N, vcpu_period=US or vcpu_quota=US (-1: no limit); repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[command(flatten)]
    modify: ModifyArgs,
}

#[derive(clap::Args)]
pub struct MemtuneArgs {
    #[command(flatten)]
    dom: Dom,
    /// Sizes as virsh takes them: KiB, or with a unit (512M, 1G); -1 lifts the limit.
    #[arg(long, allow_hyphen_values = true)]
    hard_limit: Option<String>,
    #[arg(long, allow_hyphen_values = true)]
    soft_limit: Option<String>,
    #[arg(long, allow_hyphen_values = true)]
    swap_hard_limit: Option<String>,
    #[command(flatten)]
    modify: ModifyArgs,
}

#[derive(clap::Args)]
pub struct VcpupinArgs {
    #[command(flatten)]
    dom: Dom,
    /// vCPU number (without it: show every vCPU's pin).
    vcpu: Option<u32>,
    /// Host CPUs, e.g. 0,1 or 2-3.
    cpulist: Option<String>,
    #[command(flatten)]
    modify: ModifyArgs,
}

#[derive(clap::Args)]
pub struct SetvcpusArgs {
    #[command(flatten)]
    dom: Dom,
    count: u32,
    #[command(flatten)]
    modify: ModifyArgs,
}

#[derive(clap::Args)]
pub struct SetmemArgs {
    #[command(flatten)]
    dom: Dom,
    /// KiB as virsh takes it, or with a unit (512M).
    size: String,
    #[command(flatten)]
    modify: ModifyArgs,
}

#[derive(clap::Args)]
pub struct BlkdeviotuneArgs {
    #[command(flatten)]
    dom: Dom,
    /// The disk: vda, vdb, ... or its path.
    disk: String,
    /// Bytes/s each way (0 lifts the limit).
    #[arg(long)]
    total_bytes_sec: Option<u64>,
    #[arg(long)]
    read_bytes_sec: Option<u64>,
    #[arg(long)]
    write_bytes_sec: Option<u64>,
    /// Operations/s each way.
    #[arg(long)]
    total_iops_sec: Option<u64>,
    #[arg(long)]
    read_iops_sec: Option<u64>,
    #[arg(long)]
    write_iops_sec: Option<u64>,
    #[command(flatten)]
    modify: ModifyArgs,
}

#[derive(clap::Args)]
pub struct BlkiotuneArgs {
    #[command(flatten)]
    dom: Dom,
    /// Block I/O weight, 10..1000.
    #[arg(long)]
    weight: Option<u64>,
    /// A host block device's limit: /dev/sda,N (0 lifts it); repeatable.
    #[arg(long, value_name = "DEVICE,N")]
    device_read_bytes_sec: Vec<String>,
    #[arg(long, value_name = "DEVICE,N")]
    device_write_bytes_sec: Vec<String>,
    #[arg(long, value_name = "DEVICE,N")]
    device_read_iops_sec: Vec<String>,
    #[arg(long, value_name = "DEVICE,N")]
    device_write_iops_sec: Vec<String>,
    #[command(flatten)]
    modify: ModifyArgs,
}

#[derive(clap::Args)]
pub struct DomblkstatArgs {
    #[command(flatten)]
    dom: Dom,
    /// One disk (vda or its path); all without it.
    disk: Option<String>,
}

#[derive(clap::Args)]
pub struct DomifstatArgs {
    #[command(flatten)]
    dom: Dom,
    /// The interface: its tap (oxvnet0), MAC or net0.
    interface: String,
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    connect: Connect,
    /// Domain name (default: generated).
    #[arg(long)]
    name: Option<String>,
    /// Transient: the domain is forgotten when it stops.
    #[arg(long)]
    rm: bool,
    #[arg(long, value_name = "FILE")]
    kernel: PathBuf,
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    #[arg(long)]
    cmdline: Option<String>,
    #[arg(long)]
    vcpus: Option<u32>,
    #[arg(long, value_name = "host|pvm-compat")]
    cpu_profile: Option<String>,
    /// CPUs the domain may use in all (1.5 = one and a half).
    #[arg(long)]
    cpus: Option<String>,
    #[arg(long)]
    cpu_shares: Option<u64>,
    #[arg(long)]
    cpuset_cpus: Option<String>,
    #[arg(long)]
    cpuset_mems: Option<String>,
    /// Guest RAM and a hard limit of that plus the VMM's overhead.
    #[arg(long)]
    memory: Option<String>,
    /// Guest RAM apart from --memory's limit (overcommit).
    #[arg(long)]
    guest_memory: Option<String>,
    /// Memory plus swap (Docker's rules: unset is twice --memory, -1 unlimited).
    #[arg(long, allow_hyphen_values = true)]
    memory_swap: Option<String>,
    #[arg(long)]
    memory_reservation: Option<String>,
    #[arg(long)]
    pids_limit: Option<u64>,
    /// Rates for a guest disk (vda:1mb) or a host block device (/dev/sda:1mb); repeatable.
    #[arg(long)]
    device_read_bps: Vec<String>,
    #[arg(long)]
    device_write_bps: Vec<String>,
    #[arg(long)]
    device_read_iops: Vec<String>,
    #[arg(long)]
    device_write_iops: Vec<String>,
    /// A guest disk: path=FILE (or vol=POOL/NAME)[,format=raw|qcow2][,readonly=on][,cache=MODE][,serial=ID] (repeatable; vda, vdb, ...).
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// A NIC on the daemon's NAT network: default (repeatable), or none.
    #[arg(long, value_name = "NAME")]
    network: Vec<String>,
    /// A virtio-rng device.
    #[arg(long)]
    rng: bool,
    /// sys_nice: real-time vCPU threads (libvirt's vcpusched fifo:1).
    #[arg(long, value_name = "CAP")]
    cap_add: Vec<String>,
    /// A cloud-init seed disk: user-data=PATH[,meta-data=PATH][,network-config=PATH][,vendor-data=PATH] (virt-install's keys).
    #[arg(long, value_name = "SPEC")]
    cloud_init: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum Verb {
    /// Define a domain from a TOML file.
    Define(DefineArgs),
    /// Remove a domain's definition.
    Undefine(UndefineArgs),
    /// Start a defined domain.
    Start(StartArgs),
    /// Attach to a running domain's serial console (Ctrl-] detaches).
    Console(Dom),
    /// Ask the guest to power off, then stop the VMM.
    Shutdown(ShutdownArgs),
    /// Stop a domain at once (kill its VMM).
    Destroy(Dom),
    /// Reset the guest.
    Reboot(Dom),
    /// Pause the vCPUs.
    Suspend(Dom),
    /// Continue a paused domain.
    Resume(Dom),
    /// List domains.
    List(ListArgs),
    /// Show a domain's details.
    Dominfo(Dom),
    /// Show a domain's state.
    Domstate(DomstateArgs),
    /// Print a domain's TOML definition.
    Dumpconfig(Dom),
    /// Start the domain with the daemon (or not, with --disable).
    Autostart(AutostartArgs),
    /// Show or set cpu_shares, vcpu_period, vcpu_quota.
    Schedinfo(SchedinfoArgs),
    /// Show or set hard_limit, soft_limit, swap_hard_limit.
    Memtune(MemtuneArgs),
    /// Show or set the host CPUs of a vCPU.
    Vcpupin(VcpupinArgs),
    /// Show or set a guest disk's rate limits.
    Blkdeviotune(BlkdeviotuneArgs),
    /// Show or set the block I/O weight and host-device throttles.
    Blkiotune(BlkiotuneArgs),
    /// Show disk I/O counters.
    Domblkstat(DomblkstatArgs),
    /// Show a NIC's counters.
    Domifstat(DomifstatArgs),
    /// Move a running domain to another oxvirtd.
    Migrate(MigrateArgs),
    /// Cap a running migration's bandwidth (MiB/s).
    #[command(name = "migrate-setspeed")]
    MigrateSetspeed(SetspeedArgs),
    /// Set the pause a migration may end with (ms).
    #[command(name = "migrate-setmaxdowntime")]
    MigrateSetmaxdowntime(SetdowntimeArgs),
    /// Show a running save or migration job.
    Domjobinfo(Dom),
    /// Save a running domain's state to a file and stop it.
    Save(SaveArgs),
    /// Run a domain again from a state file written by save.
    Restore(RestoreArgs),
    /// Save a running domain's state for its next start, and stop it.
    Managedsave(Dom),
    /// Take an internal snapshot of every disk (and a running domain's memory).
    #[command(name = "snapshot-create-as")]
    SnapshotCreateAs(SnapshotCreateArgs),
    /// List a domain's snapshots.
    #[command(name = "snapshot-list")]
    SnapshotList(Dom),
    /// Put every disk (and, with memory, the guest) back to a snapshot.
    #[command(name = "snapshot-revert")]
    SnapshotRevert(SnapshotArgs),
    /// Delete a snapshot from every disk, and its memory.
    #[command(name = "snapshot-delete")]
    SnapshotDelete(SnapshotArgs),
    /// Set the number of vCPUs (--config: at the next start).
    Setvcpus(SetvcpusArgs),
    /// Set the guest's memory (--config: at the next start).
    Setmem(SetmemArgs),
    /// Set the most memory setmem may give (--config).
    Setmaxmem(SetmemArgs),
    /// Create and start a domain with Docker's resource flags.
    Run(Box<RunArgs>),
    #[command(flatten)]
    Net(net::NetVerb),
    #[command(flatten)]
    Pool(pool::PoolVerb),
    #[command(flatten)]
    Disk(disk::DiskVerb),
}

pub fn run(verb: Verb) -> anyhow::Result<u8> {
    match verb {
        Verb::Define(a) => {
            let text = std::fs::read_to_string(&a.file)
                .with_context(|| format!("reading {}", a.file.display()))?;
            let info = wait(
                a.connect
                    .client()?
                    .define(&text, &a.file.display().to_string()),
            )?;
            println!("Domain '{}' defined from {}", info.name, a.file.display());
        }
        Verb::Undefine(a) => {
            wait(
                a.dom
                    .connect
                    .client()?
                    .undefine(&a.dom.domain, a.force, a.snapshots_metadata),
            )?;
            println!("Domain '{}' has been undefined", a.dom.domain);
        }
        Verb::Start(a) => {
            lifecycle(&a.dom, "start", "started")?;
            if a.console {
                return console::attach(&a.dom.connect.client()?, &a.dom.domain);
            }
        }
        Verb::Console(d) => return console::attach(&d.connect.client()?, &d.domain),
        Verb::Destroy(d) => lifecycle(&d, "destroy", "destroyed")?,
        Verb::Reboot(d) => lifecycle(&d, "reboot", "is being rebooted")?,
        Verb::Suspend(d) => lifecycle(&d, "suspend", "suspended")?,
        Verb::Resume(d) => lifecycle(&d, "resume", "resumed")?,
        Verb::Shutdown(a) => {
            let timeout = Duration::from_secs(a.timeout);
            wait(a.dom.connect.client()?.shutdown(&a.dom.domain, timeout))?;
            println!("Domain '{}' is being shutdown", a.dom.domain);
        }
        Verb::List(a) => {
            let all = a.all;
            let domains = wait(a.connect.client()?.list(all))?;
            print::list(&domains, a.name);
        }
        Verb::Dominfo(d) => print::dominfo(&wait(d.connect.client()?.info(&d.domain))?),
        Verb::Domstate(a) => {
            let s = wait(a.dom.connect.client()?.state(&a.dom.domain))?;
            match a.reason {
                true => println!("{} ({})", s.state, s.reason),
                false => println!("{}", s.state),
            }
        }
        Verb::Dumpconfig(d) => print!("{}", wait(d.connect.client()?.config(&d.domain))?),
        Verb::Autostart(a) => {
            let enabled = !a.disable;
            wait(
                a.dom
                    .connect
                    .client()?
                    .set_autostart(&a.dom.domain, enabled),
            )?;
            match enabled {
                true => println!("Domain '{}' marked as autostarted", a.dom.domain),
                false => println!("Domain '{}' unmarked as autostarted", a.dom.domain),
            }
        }
        Verb::Schedinfo(a) => schedinfo(a)?,
        Verb::Memtune(a) => memtune(a)?,
        Verb::Vcpupin(a) => vcpupin(a)?,
        Verb::Run(a) => run_domain(*a)?,
        Verb::Net(v) => net::run(v)?,
        Verb::Pool(v) => pool::run(v)?,
        Verb::Disk(v) => disk::run(v)?,
        Verb::Blkdeviotune(a) => blkdeviotune(a)?,
        Verb::Blkiotune(a) => blkiotune(a)?,
        Verb::Domblkstat(a) => {
            let c = a.dom.connect.client()?;
            print::domblkstat(&wait(c.domblkstat(&a.dom.domain, a.disk.as_deref()))?);
        }
        Verb::Domifstat(a) => {
            let c = a.dom.connect.client()?;
            print::domifstat(&wait(c.domifstat(&a.dom.domain, &a.interface))?);
        }
        Verb::Migrate(a) => migrate(a)?,
        Verb::MigrateSetspeed(a) => {
            let change = MigrateParameters {
                max_bandwidth_mib: Some(a.bandwidth),
                ..MigrateParameters::default()
            };
            wait(
                a.dom
                    .connect
                    .client()?
                    .migrate_parameters(&a.dom.domain, &change),
            )?;
        }
        Verb::MigrateSetmaxdowntime(a) => {
            let change = MigrateParameters {
                downtime_limit_ms: Some(a.downtime),
                ..MigrateParameters::default()
            };
            wait(
                a.dom
                    .connect
                    .client()?
                    .migrate_parameters(&a.dom.domain, &change),
            )?;
        }
        Verb::Domjobinfo(d) => print::jobinfo(&wait(d.connect.client()?.job_info(&d.domain))?),
        Verb::Save(a) => {
            let file = std::path::absolute(&a.file).context("save file")?;
            wait(a.dom.connect.client()?.save(&a.dom.domain, &file))?;
            println!("Domain '{}' saved to {}", a.dom.domain, file.display());
        }
        Verb::Restore(a) => {
            let file = std::path::absolute(&a.file).context("restore file")?;
            let info = wait(a.connect.client()?.restore(&file))?;
            println!("Domain '{}' restored from {}", info.name, file.display());
        }
        Verb::Managedsave(d) => {
            wait(d.connect.client()?.managed_save(&d.domain))?;
            println!("Domain '{}' state saved (managed save)", d.domain);
        }
        Verb::SnapshotCreateAs(a) => {
            let c = a.dom.connect.client()?;
            let s = wait(c.snapshot_create(&a.dom.domain, &a.name, a.description.as_deref()))?;
            println!("Domain snapshot {} created", s.name);
        }
        Verb::SnapshotList(d) => print::snapshots(&wait(d.connect.client()?.snapshots(&d.domain))?),
        Verb::SnapshotRevert(a) => {
            wait(
                a.dom
                    .connect
                    .client()?
                    .snapshot_revert(&a.dom.domain, &a.name),
            )?;
            println!("Domain '{}' reverted to snapshot {}", a.dom.domain, a.name);
        }
        Verb::SnapshotDelete(a) => {
            wait(
                a.dom
                    .connect
                    .client()?
                    .snapshot_delete(&a.dom.domain, &a.name),
            )?;
            println!("Domain snapshot {} deleted", a.name);
        }
        Verb::Setvcpus(a) => sizing(
            &a.dom,
            Sizing {
                vcpus: Some(a.count),
                ..Sizing::default()
            },
            a.modify,
        )?,
        Verb::Setmem(a) => {
            let memory = Some(kib_or_size("size", &a.size)?);
            sizing(
                &a.dom,
                Sizing {
                    memory,
                    ..Sizing::default()
                },
                a.modify,
            )?
        }
        Verb::Setmaxmem(a) => {
            let max_memory = Some(kib_or_size("size", &a.size)?);
            sizing(
                &a.dom,
                Sizing {
                    max_memory,
                    ..Sizing::default()
                },
                a.modify,
            )?
        }
    }
    Ok(0)
}

/// One API call, run to completion.
fn wait<T>(
    call: impl std::future::Future<Output = Result<T, daemon::client::ClientError>>,
) -> anyhow::Result<T> {
    Ok(block_on(call)??)
}

fn migrate(a: MigrateArgs) -> anyhow::Result<()> {
    let destination = ConnectUri::parse(&a.desturi)?;
    let token = match (destination.remote(), &a.dest_token_file) {
        (None, _) => None,
        (Some(_), Some(file)) => Some(Token::read(file)?),
        (Some(_), None) => a.dom.connect.token()?,
    };
    let ca = match destination {
        ConnectUri::Tls { .. } => {
            let file = a
                .dest_ca_file
                .clone()
                .or_else(|| a.dom.connect.ca_file())
                .context(
                "an oxvirt+tls:// destination needs --dest-ca-file (or --ca-file, $OXVIRT_CA_FILE)",
            )?;
            let pem = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            Some(pem)
        }
        _ => None,
    };
    let request = MigrateRequest {
        destination: a.desturi.clone(),
        destination_token: token.map(|t| t.as_str().to_owned()),
        destination_ca: ca,
        persistent: a.persistent,
        undefine_source: a.undefinesource,
    };
    wait(a.dom.connect.client()?.migrate(&a.dom.domain, &request))?;
    println!("Domain '{}' migrated to {}", a.dom.domain, a.desturi);
    Ok(())
}

fn lifecycle(d: &Dom, action: &'static str, done: &str) -> anyhow::Result<()> {
    wait(d.connect.client()?.action(&d.domain, action))?;
    println!("Domain '{}' {done}", d.domain);
    Ok(())
}

fn schedinfo(a: SchedinfoArgs) -> anyhow::Result<()> {
    let change = match a.set.is_empty() {
        true => None,
        false => Some(parse_schedinfo(&a.set)?),
    };
    let modify = a.modify.modify();
    let info = wait(
        a.dom
            .connect
            .client()?
            .schedinfo(&a.dom.domain, change.as_ref(), modify),
    )?;
    print::schedinfo(&info);
    Ok(())
}

fn parse_schedinfo(set: &[String]) -> anyhow::Result<SchedInfo> {
    let mut info = SchedInfo::default();
    for item in set {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("--set {item:?}: expected KEY=VALUE"))?;
        let bad = |e: std::num::ParseIntError| anyhow::anyhow!("--set {key}={value:?}: {e}");
        match key {
            "cpu_shares" => info.cpu_shares = Some(value.parse().map_err(bad)?),
            "vcpu_period" => info.vcpu_period = Some(value.parse().map_err(bad)?),
            "vcpu_quota" => info.vcpu_quota = Some(value.parse().map_err(bad)?),
            _ => anyhow::bail!("--set {key}: expected cpu_shares, vcpu_period or vcpu_quota"),
        }
    }
    Ok(info)
}

fn blkdeviotune(a: BlkdeviotuneArgs) -> anyhow::Result<()> {
    let change = DiskThrottle {
        total_bps: a.total_bytes_sec,
        read_bps: a.read_bytes_sec,
        write_bps: a.write_bytes_sec,
        total_iops: a.total_iops_sec,
        read_iops: a.read_iops_sec,
        write_iops: a.write_iops_sec,
    };
    let given = change != DiskThrottle::default();
    let c = a.dom.connect.client()?;
    let t = wait(c.blkdeviotune(
        &a.dom.domain,
        &a.disk,
        given.then_some(&change),
        a.modify.modify(),
    ))?;
    print::blkdeviotune(&t);
    Ok(())
}

/// virsh's `DEVICE,N` as Docker's `DEVICE:N`.
fn device_limits(flag: &str, values: &[String]) -> anyhow::Result<Vec<String>> {
    values
        .iter()
        .map(|v| {
            let (device, rate) = v
                .rsplit_once(',')
                .with_context(|| format!("--{flag} {v:?}: expected DEVICE,N"))?;
            rate.parse::<u64>()
                .with_context(|| format!("--{flag} {v:?}: {rate:?} is not a number"))?;
            Ok(format!("{device}:{rate}"))
        })
        .collect()
}

fn blkiotune(a: BlkiotuneArgs) -> anyhow::Result<()> {
    let change = BlkioTune {
        weight: a.weight,
        device_read_bps: device_limits("device-read-bytes-sec", &a.device_read_bytes_sec)?,
        device_write_bps: device_limits("device-write-bytes-sec", &a.device_write_bytes_sec)?,
        device_read_iops: device_limits("device-read-iops-sec", &a.device_read_iops_sec)?,
        device_write_iops: device_limits("device-write-iops-sec", &a.device_write_iops_sec)?,
    };
    let c = a.dom.connect.client()?;
    let given = change != BlkioTune::default();
    let t = wait(c.blkiotune(&a.dom.domain, given.then_some(&change), a.modify.modify()))?;
    print::blkiotune(&t);
    Ok(())
}

fn sizing(d: &Dom, change: Sizing, modify: ModifyArgs) -> anyhow::Result<()> {
    let s = wait(
        d.connect
            .client()?
            .set_sizing(&d.domain, &change, modify.modify()),
    )?;
    print::sizing(&s);
    Ok(())
}

/// A size in KiB (virsh's unit) or with a unit (512M).
fn kib_or_size(flag: &str, text: &str) -> anyhow::Result<u64> {
    let bytes = match text.parse::<u64>() {
        Ok(kib) => kib.checked_mul(1024).context("too large")?,
        Err(_) => daemon::tune::parse_bytes(text).with_context(|| format!("{flag} {text}"))?,
    };
    Ok(bytes)
}

/// A memtune size: -1, KiB (virsh's unit), or a size with a unit.
fn memtune_size(flag: &str, text: &str) -> anyhow::Result<i64> {
    if text == "-1" {
        return Ok(-1);
    }
    let bytes = kib_or_size(&format!("--{flag}"), text)?;
    i64::try_from(bytes).with_context(|| format!("--{flag} {text}: too large"))
}

fn memtune(a: MemtuneArgs) -> anyhow::Result<()> {
    let sizes = [
        ("hard-limit", &a.hard_limit),
        ("soft-limit", &a.soft_limit),
        ("swap-hard-limit", &a.swap_hard_limit),
    ];
    let mut parsed = [None; 3];
    for (slot, (flag, value)) in parsed.iter_mut().zip(sizes) {
        *slot = value
            .as_deref()
            .map(|v| memtune_size(flag, v))
            .transpose()?;
    }
    let change = parsed.iter().any(Option::is_some).then_some(MemTune {
        hard_limit: parsed[0],
        soft_limit: parsed[1],
        swap_hard_limit: parsed[2],
    });
    let modify = a.modify.modify();
    let info = wait(
        a.dom
            .connect
            .client()?
            .memtune(&a.dom.domain, change.as_ref(), modify),
    )?;
    print::memtune(&info);
    Ok(())
}

fn vcpupin(a: VcpupinArgs) -> anyhow::Result<()> {
    let pin = match (a.vcpu, a.cpulist) {
        (Some(vcpu), Some(cpulist)) => Some(VcpuPin { vcpu, cpulist }),
        (Some(_), None) => anyhow::bail!("vcpupin: give a cpulist after the vCPU number"),
        _ => None,
    };
    let modify = a.modify.modify();
    let pins = wait(
        a.dom
            .connect
            .client()?
            .vcpupin(&a.dom.domain, pin.as_ref(), modify),
    )?;
    print::vcpupin(&pins);
    Ok(())
}

fn run_domain(a: RunArgs) -> anyhow::Result<()> {
    let transient = a.rm;
    let def = RunSpec {
        name: a.name,
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: a.cmdline,
        vcpus: a.vcpus,
        cpu_profile: a.cpu_profile,
        cpus: a.cpus,
        cpu_shares: a.cpu_shares,
        cpuset_cpus: a.cpuset_cpus,
        cpuset_mems: a.cpuset_mems,
        memory: a.memory,
        guest_memory: a.guest_memory,
        memory_swap: a.memory_swap,
        memory_reservation: a.memory_reservation,
        pids_limit: a.pids_limit,
        device_read_bps: a.device_read_bps,
        device_write_bps: a.device_write_bps,
        device_read_iops: a.device_read_iops,
        device_write_iops: a.device_write_iops,
        disks: a.disk,
        networks: a.network,
        rng: a.rng,
        cap_add: a.cap_add,
        cloud_init: a.cloud_init,
    }
    .into_definition()?;
    let text = def.to_toml()?;
    let info = wait(a.connect.client()?.run(&text, transient))?;
    println!("{}", info.name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::connect_after_verb;

    fn moved(args: &[&str]) -> Vec<String> {
        let args = args.iter().map(Into::into).collect();
        connect_after_verb(args)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn a_leading_connect_moves_after_the_verb() {
        assert_eq!(
            moved(&["oxvirt", "-c", "oxvirt:///session", "list", "--all"]),
            ["oxvirt", "list", "-c", "oxvirt:///session", "--all"]
        );
        assert_eq!(
            moved(&["oxvirt", "--connect=/s.sock", "start", "web"]),
            ["oxvirt", "start", "--connect=/s.sock", "web"]
        );
    }

    #[test]
    fn other_arguments_are_left_alone() {
        for args in [
            &["oxvirt", "list", "-c", "/s.sock"][..],
            &["oxvirt", "img", "info", "-c", "x"],
            &["oxvirt", "-c", "/s.sock"],
            &["oxvirt"],
        ] {
            assert_eq!(moved(args), args);
        }
    }
}
