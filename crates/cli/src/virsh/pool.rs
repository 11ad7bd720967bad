//! virsh's storage verbs (`pool-list`, `pool-define-as`, `vol-create-as`,
//! `vol-list`, ...): each one API call, printed as virsh prints it.

use std::path::PathBuf;

use anyhow::Context;
use daemon::client::Client;
use daemon::pool::{PoolInfo, ResizeRequest, VolumeInfo, VolumeRequest};
use daemon::pooldef::{PoolDef, PoolType};

use super::{wait, Connect};

/// The pool a verb acts on: `POOL` or virsh's `--pool POOL`.
#[derive(clap::Args)]
pub struct Pool {
    #[command(flatten)]
    connect: Connect,
    /// Pool name.
    #[arg(required_unless_present = "pool_flag", conflicts_with = "pool_flag")]
    pool: Option<String>,
    /// Pool name (virsh's spelling).
    #[arg(long = "pool", id = "pool_flag", value_name = "POOL")]
    pool_flag: Option<String>,
}

impl Pool {
    fn name(&self) -> &str {
        // clap makes sure one of the two is there.
        self.pool
            .as_deref()
            .or(self.pool_flag.as_deref())
            .unwrap_or_default()
    }
}

/// The volume a verb acts on: `VOL --pool POOL`, `POOL/VOL`, or the
/// volume's path.
#[derive(clap::Args)]
pub struct Vol {
    #[command(flatten)]
    connect: Connect,
    /// Volume name (with --pool), POOL/NAME, or the volume's path.
    vol: String,
    /// The pool that holds the volume.
    #[arg(long, value_name = "POOL")]
    pool: Option<String>,
}

impl Vol {
    /// The pool and volume names, asking the daemon for a path's volume.
    fn resolve(&self, client: &Client) -> anyhow::Result<(String, String)> {
        if let Some(pool) = &self.pool {
            return Ok((pool.clone(), self.vol.clone()));
        }
        if self.vol.starts_with('/') {
            let info = wait(client.vol_by_path(&self.vol))?;
            return Ok((info.pool, info.name));
        }
        match self.vol.split_once('/') {
            Some((pool, name)) => Ok((pool.to_owned(), name.to_owned())),
            None => anyhow::bail!(
                "volume {:?}: give its pool (--pool POOL or POOL/{}) or its path",
                self.vol,
                self.vol
            ),
        }
    }
}

#[derive(clap::Args)]
pub struct PoolListArgs {
    #[command(flatten)]
    connect: Connect,
    /// Inactive pools too.
    #[arg(long)]
    all: bool,
    /// Sizes too.
    #[arg(long)]
    details: bool,
    /// Names only.
    #[arg(long)]
    name: bool,
}

#[derive(clap::Args)]
pub struct PoolDefineArgs {
    #[command(flatten)]
    connect: Connect,
    /// The pool's TOML definition.
    file: PathBuf,
}

#[derive(clap::Args)]
pub struct PoolDefineAsArgs {
    #[command(flatten)]
    connect: Connect,
    /// Pool name.
    name: String,
    /// Pool type (only dir).
    #[arg(value_name = "TYPE")]
    kind: PoolType,
    /// The folder of the pool's volumes.
    #[arg(long, value_name = "DIR")]
    target: PathBuf,
}

#[derive(clap::Args)]
pub struct PoolAutostartArgs {
    #[command(flatten)]
    pool: Pool,
    /// Stop starting it with the daemon.
    #[arg(long)]
    disable: bool,
}

#[derive(clap::Args)]
pub struct VolListArgs {
    #[command(flatten)]
    pool: Pool,
    /// Type and sizes too.
    #[arg(long)]
    details: bool,
}

#[derive(clap::Args)]
pub struct VolCreateAsArgs {
    #[command(flatten)]
    connect: Connect,
    /// Pool name.
    pool: String,
    /// Volume name (its file name in the pool's folder).
    name: String,
    /// Size: bytes, or with a unit (K, KiB, KB, M, G, T; K = 1024, KB = 1000).
    capacity: String,
    /// Raw volumes: space to reserve now (the rest stays sparse).
    #[arg(long, value_name = "SIZE")]
    allocation: Option<String>,
    /// raw (default) or qcow2.
    #[arg(long)]
    format: Option<String>,
    /// The qcow2 volume's backing image: a volume of the pool, or a path.
    #[arg(long, value_name = "VOL")]
    backing_vol: Option<String>,
    /// The backing image's format (probed when unset).
    #[arg(long, value_name = "FORMAT", requires = "backing_vol")]
    backing_vol_format: Option<String>,
    /// qcow2: allocate the image's metadata now.
    #[arg(long)]
    prealloc_metadata: bool,
}

#[derive(clap::Args)]
pub struct VolResizeArgs {
    #[command(flatten)]
    vol: Vol,
    /// The new size, or with --delta the growth; -SIZE with --shrink shrinks by SIZE.
    #[arg(allow_hyphen_values = true)]
    capacity: String,
    /// CAPACITY is a change, not the new size.
    #[arg(long)]
    delta: bool,
    /// Allow shrinking (data past the new end is lost).
    #[arg(long)]
    shrink: bool,
}

#[derive(clap::Args)]
pub struct VolCloneArgs {
    #[command(flatten)]
    vol: Vol,
    /// The copy's name, in the same pool.
    new_name: String,
}

#[derive(clap::Subcommand)]
pub enum PoolVerb {
    /// List active storage pools (with --all, every defined one).
    #[command(name = "pool-list")]
    List(PoolListArgs),
    /// A pool's state and space.
    #[command(name = "pool-info")]
    Info(Pool),
    /// Print a pool's TOML definition.
    #[command(name = "pool-dumpconfig", alias = "pool-dumpxml")]
    Dumpconfig(Pool),
    /// Define a pool from a TOML file.
    #[command(name = "pool-define")]
    Define(PoolDefineArgs),
    /// Define a pool: NAME dir --target DIR.
    #[command(name = "pool-define-as")]
    DefineAs(PoolDefineAsArgs),
    /// Make a pool's folder.
    #[command(name = "pool-build")]
    Build(Pool),
    /// Start (activate) a pool.
    #[command(name = "pool-start")]
    Start(Pool),
    /// Stop (deactivate) a pool; its volumes stay.
    #[command(name = "pool-destroy")]
    Destroy(Pool),
    /// Remove an inactive pool's definition; its folder stays.
    #[command(name = "pool-undefine")]
    Undefine(Pool),
    /// Remove an inactive pool's (empty) folder.
    #[command(name = "pool-delete")]
    Delete(Pool),
    /// Read a pool's folder again.
    #[command(name = "pool-refresh")]
    Refresh(Pool),
    /// Start a pool when the daemon starts.
    #[command(name = "pool-autostart")]
    Autostart(PoolAutostartArgs),
    /// List a pool's volumes.
    #[command(name = "vol-list")]
    VolList(VolListArgs),
    /// Create a volume: POOL NAME CAPACITY.
    #[command(name = "vol-create-as")]
    VolCreateAs(VolCreateAsArgs),
    /// A volume's type and sizes.
    #[command(name = "vol-info")]
    VolInfo(Vol),
    /// A volume's path.
    #[command(name = "vol-path")]
    VolPath(Vol),
    /// Delete a volume no domain uses.
    #[command(name = "vol-delete")]
    VolDelete(Vol),
    /// Change a volume's size.
    #[command(name = "vol-resize")]
    VolResize(VolResizeArgs),
    /// Copy a volume within its pool.
    #[command(name = "vol-clone")]
    VolClone(VolCloneArgs),
}

pub fn run(verb: PoolVerb) -> anyhow::Result<()> {
    match verb {
        PoolVerb::List(a) => list(&wait(a.connect.client()?.pool_list(a.all))?, &a),
        PoolVerb::Info(p) => info(&wait(p.connect.client()?.pool_info(p.name()))?),
        PoolVerb::Dumpconfig(p) => print!("{}", wait(p.connect.client()?.pool_config(p.name()))?),
        PoolVerb::Define(a) => {
            let text = std::fs::read_to_string(&a.file)
                .with_context(|| format!("reading {}", a.file.display()))?;
            let origin = a.file.display().to_string();
            let info = wait(a.connect.client()?.pool_define(&text, &origin))?;
            println!("Pool {} defined from {origin}", info.name);
        }
        PoolVerb::DefineAs(a) => {
            let def = PoolDef {
                name: a.name.clone(),
                kind: a.kind,
                target: std::path::absolute(&a.target).context("--target")?,
            };
            let info = wait(
                a.connect
                    .client()?
                    .pool_define(&def.to_toml(), "pool-define-as"),
            )?;
            println!("Pool {} defined", info.name);
        }
        PoolVerb::Build(p) => pool_action(&p, "build", "built")?,
        PoolVerb::Start(p) => pool_action(&p, "start", "started")?,
        PoolVerb::Destroy(p) => pool_action(&p, "destroy", "destroyed")?,
        PoolVerb::Refresh(p) => pool_action(&p, "refresh", "refreshed")?,
        PoolVerb::Undefine(p) => {
            wait(p.connect.client()?.pool_undefine(p.name()))?;
            println!("Pool {} has been undefined", p.name());
        }
        PoolVerb::Delete(p) => {
            wait(p.connect.client()?.pool_delete(p.name()))?;
            println!("Pool {} deleted", p.name());
        }
        PoolVerb::Autostart(a) => {
            wait(
                a.pool
                    .connect
                    .client()?
                    .pool_autostart(a.pool.name(), !a.disable),
            )?;
            match a.disable {
                false => println!("Pool {} marked as autostarted", a.pool.name()),
                true => println!("Pool {} unmarked as autostarted", a.pool.name()),
            }
        }
        PoolVerb::VolList(a) => {
            let volumes = wait(a.pool.connect.client()?.vol_list(a.pool.name()))?;
            vol_list(&volumes, a.details);
        }
        PoolVerb::VolCreateAs(a) => vol_create(a)?,
        PoolVerb::VolInfo(v) => {
            let client = v.connect.client()?;
            let (pool, name) = v.resolve(&client)?;
            vol_info(&wait(client.vol_info(&pool, &name))?);
        }
        PoolVerb::VolPath(v) => {
            let client = v.connect.client()?;
            let (pool, name) = v.resolve(&client)?;
            println!("{}", wait(client.vol_info(&pool, &name))?.path.display());
        }
        PoolVerb::VolDelete(v) => {
            let client = v.connect.client()?;
            let (pool, name) = v.resolve(&client)?;
            wait(client.vol_delete(&pool, &name))?;
            println!("Vol {name} deleted");
        }
        PoolVerb::VolResize(a) => {
            let client = a.vol.connect.client()?;
            let (pool, name) = a.vol.resolve(&client)?;
            let request = ResizeRequest {
                capacity: a.capacity.clone(),
                delta: a.delta,
                shrink: a.shrink,
            };
            wait(client.vol_resize(&pool, &name, &request))?;
            println!(
                "Size of volume '{name}' successfully changed to {}",
                a.capacity
            );
        }
        PoolVerb::VolClone(a) => {
            let client = a.vol.connect.client()?;
            let (pool, name) = a.vol.resolve(&client)?;
            wait(client.vol_clone(&pool, &name, &a.new_name))?;
            println!("Vol {} cloned from {name}", a.new_name);
        }
    }
    Ok(())
}

fn pool_action(p: &Pool, action: &str, done: &str) -> anyhow::Result<()> {
    wait(p.connect.client()?.pool_action(p.name(), action))?;
    println!("Pool {} {done}", p.name());
    Ok(())
}

fn vol_create(a: VolCreateAsArgs) -> anyhow::Result<()> {
    let request = VolumeRequest {
        name: a.name.clone(),
        capacity: a.capacity,
        allocation: a.allocation,
        format: a.format,
        backing_vol: a.backing_vol,
        backing_vol_format: a.backing_vol_format,
        prealloc_metadata: a.prealloc_metadata,
    };
    wait(a.connect.client()?.vol_create(&a.pool, &request))?;
    println!("Vol {} created", a.name);
    Ok(())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// virsh's vshPrettyCapacity: two decimals and a binary unit.
pub fn capacity(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes}.00 B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}

fn opt_capacity(bytes: Option<u64>) -> String {
    bytes.map_or("-".to_owned(), capacity)
}

/// Rows under a header, each column as wide as its widest cell (virsh's
/// table printer), with the dashed rule under the header.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c:<w$}"))
            .collect();
        format!(" {}", padded.join("   ")).trim_end().to_owned()
    };
    let head = line(header.to_vec());
    println!("{head}");
    println!("{}", "-".repeat(head.len() + 2));
    for row in rows {
        println!("{}", line(row.iter().map(String::as_str).collect()));
    }
}

fn list(pools: &[PoolInfo], a: &PoolListArgs) {
    if a.name {
        for p in pools {
            println!("{}", p.name);
        }
        return;
    }
    if !a.details {
        let rows: Vec<Vec<String>> = pools
            .iter()
            .map(|p| {
                let state = if p.active { "active" } else { "inactive" };
                vec![p.name.clone(), state.into(), yes_no(p.autostart).into()]
            })
            .collect();
        return table(&["Name", "State", "Autostart"], &rows);
    }
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.state.clone(),
                yes_no(p.autostart).into(),
                yes_no(p.persistent).into(),
                opt_capacity(p.capacity),
                opt_capacity(p.allocation),
                opt_capacity(p.available),
            ]
        })
        .collect();
    table(
        &[
            "Name",
            "State",
            "Autostart",
            "Persistent",
            "Capacity",
            "Allocation",
            "Available",
        ],
        &rows,
    );
}

fn info(p: &PoolInfo) {
    println!("{:<15} {}", "Name:", p.name);
    println!("{:<15} {}", "State:", p.state);
    println!("{:<15} {}", "Persistent:", yes_no(p.persistent));
    println!("{:<15} {}", "Autostart:", yes_no(p.autostart));
    if let (Some(c), Some(a), Some(v)) = (p.capacity, p.allocation, p.available) {
        println!("{:<15} {}", "Capacity:", capacity(c));
        println!("{:<15} {}", "Allocation:", capacity(a));
        println!("{:<15} {}", "Available:", capacity(v));
    }
}

fn vol_list(volumes: &[VolumeInfo], details: bool) {
    let path = |v: &VolumeInfo| v.path.display().to_string();
    if !details {
        let rows: Vec<Vec<String>> = volumes
            .iter()
            .map(|v| vec![v.name.clone(), path(v)])
            .collect();
        return table(&["Name", "Path"], &rows);
    }
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                path(v),
                "file".into(),
                capacity(v.capacity),
                capacity(v.allocation),
            ]
        })
        .collect();
    table(&["Name", "Path", "Type", "Capacity", "Allocation"], &rows);
}

fn vol_info(v: &VolumeInfo) {
    println!("{:<15} {}", "Name:", v.name);
    println!("{:<15} file", "Type:");
    println!("{:<15} {}", "Capacity:", capacity(v.capacity));
    println!("{:<15} {}", "Allocation:", capacity(v.allocation));
}

#[cfg(test)]
mod tests {
    use super::capacity;

    #[test]
    fn capacities_print_as_virsh_prints_them() {
        assert_eq!(capacity(0), "0.00 B");
        assert_eq!(capacity(1023), "1023.00 B");
        assert_eq!(capacity(1024), "1.00 KiB");
        assert_eq!(capacity(196 * 1024), "196.00 KiB");
        assert_eq!(capacity(1 << 30), "1.00 GiB");
        assert_eq!(capacity(105_088_212_992), "97.87 GiB");
    }
}
