//! `oxvirt img`: qemu-img's arguments, output and exit codes. Every verb
//! parses, calls one `diskimg` function and prints its result.

mod opts;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use diskimg::image::{probe, Chain, Format};
use diskimg::ops::compare::Comparison;
use diskimg::ops::convert::ConvertOptions;
use diskimg::ops::info;
use diskimg::qcow2::check::{CheckResult, Repair};
use diskimg::qcow2::create::CreateOptions;
use diskimg::qcow2::header::Compression;
use opts::{on_off, parse_size, Opts};

/// qemu-img compatible image tool.
#[derive(clap::Args)]
pub struct Args {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

pub fn run(args: Args) -> Result<u8> {
    let Some((verb, rest)) = args.rest.split_first() else {
        bail!("missing command (create, info, check, convert, compare, map, resize, snapshot, commit, rebase, measure)");
    };
    match verb.as_str() {
        "create" => create(rest),
        "info" => info_cmd(rest),
        "check" => check(rest),
        "convert" => convert(rest),
        "compare" => compare(rest),
        "map" => map(rest),
        "resize" => resize(rest),
        "snapshot" => snapshot(rest),
        "commit" => commit(rest),
        "rebase" => rebase(rest),
        "measure" => measure(rest),
        other => bail!("Command not found: {other}"),
    }
}

fn format_arg(o: &Opts, name: &str) -> Result<Option<Format>> {
    o.value(name)
        .map(|f| f.parse::<Format>().map_err(Into::into))
        .transpose()
}

fn one_file(o: &Opts, verb: &str) -> Result<PathBuf> {
    match o.positional.as_slice() {
        [f] => Ok(PathBuf::from(f)),
        _ => bail!("{verb}: expecting one image file name"),
    }
}

/// Applies `-o key=value` options for qcow2.
fn qcow2_options(o: &Opts, c: &mut CreateOptions) -> Result<()> {
    for (k, v) in o.options() {
        match k.as_str() {
            "compat" => {
                c.version = match v.as_str() {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => bail!("Invalid compatibility level: '{v}'"),
                }
            }
            "cluster_size" => c.cluster_size = parse_size(&v)?,
            "backing_file" => c.backing_file = Some(v),
            "backing_fmt" => c.backing_format = Some(v),
            "preallocation" => c.preallocation = v.parse()?,
            "lazy_refcounts" => c.lazy_refcounts = on_off(&k, &v)?,
            "refcount_bits" => {
                c.refcount_bits = v
                    .parse()
                    .with_context(|| format!("Invalid refcount_bits '{v}'"))?
            }
            "compression_type" => {
                c.compression = match v.as_str() {
                    "zlib" => Compression::Zlib,
                    "zstd" => Compression::Zstd,
                    _ => bail!("Invalid compression_type '{v}' (zlib, zstd)"),
                }
            }
            "extended_l2" => c.extended_l2 = on_off(&k, &v)?,
            "size" => c.size = parse_size(&v)?,
            _ => bail!("Invalid parameter '{k}'"),
        }
    }
    Ok(())
}

fn create(args: &[String]) -> Result<u8> {
    let o = Opts::parse(args, &["f", "o", "b", "F"], &["u", "q"])?;
    let fmt = format_arg(&o, "f")?.unwrap_or(Format::Raw);
    let (file, size) = match o.positional.as_slice() {
        [f] => (PathBuf::from(f), None),
        [f, s] => (PathBuf::from(f), Some(parse_size(s)?)),
        _ => bail!("Expecting image file name"),
    };
    let mut c = CreateOptions::default();
    if fmt == Format::Qcow2 {
        qcow2_options(&o, &mut c)?;
    } else {
        for (k, v) in o.options() {
            match (k.as_str(), v.as_str()) {
                ("preallocation", "off") => {}
                ("size", s) => c.size = parse_size(s)?,
                _ => bail!("Invalid parameter '{k}' for format {}", fmt.name()),
            }
        }
    }
    if let Some(b) = o.value("b") {
        c.backing_file = Some(b.to_string());
    }
    if let Some(f) = o.value("F") {
        c.backing_format = Some(f.to_string());
    }
    if let Some(s) = size {
        c.size = s;
    } else if let Some(b) = &c.backing_file {
        if o.has("u") {
            bail!("{}: Image creation needs a size parameter", file.display());
        }
        let path = diskimg::image::resolve_backing(&file, b);
        let bfmt = c.backing_format.as_deref().map(str::parse).transpose()?;
        c.size = diskimg::open(&path, true, bfmt)
            .with_context(|| format!("Could not open backing image '{b}'"))?
            .size();
    } else if c.size == 0 && !o.options().iter().any(|(k, _)| k == "size") {
        bail!("{}: Image creation needs a size parameter", file.display());
    }
    if let (Some(b), false) = (&c.backing_file, o.has("u")) {
        let path = diskimg::image::resolve_backing(&file, b);
        let bfmt = c.backing_format.as_deref().map(str::parse).transpose()?;
        diskimg::open(&path, true, bfmt)
            .with_context(|| format!("Could not open backing image '{b}'"))?;
    }
    if c.backing_file.is_some() && c.backing_format.is_none() {
        let path =
            diskimg::image::resolve_backing(&file, c.backing_file.as_deref().unwrap_or_default());
        if let Ok(f) = probe(&path) {
            c.backing_format = Some(f.name().to_string());
        }
    }
    match fmt {
        Format::Qcow2 => diskimg::qcow2::create::create(&file, &c)?,
        Format::Raw => {
            if c.backing_file.is_some() {
                bail!("'raw' does not support backing files");
            }
            diskimg::raw::Raw::create(&file, c.size)?
        }
        Format::Vmdk => bail!("creating VMDK images is not supported"),
    }
    if !o.has("q") {
        println!(
            "Formatting '{}', fmt={} size={}",
            file.display(),
            fmt.name(),
            c.size
        );
    }
    Ok(0)
}

/// JSON as qemu-img prints it: four-space indents.
fn print_json(text: serde_json::Result<String>) -> Result<()> {
    for line in text?.lines() {
        let body = line.trim_start_matches(' ');
        println!("{}{body}", " ".repeat(2 * (line.len() - body.len())));
    }
    Ok(())
}

/// A flat JSON object with its keys in the given order, as qemu-img
/// prints them.
fn print_object(fields: &[(&str, serde_json::Value)]) {
    let lines: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("    \"{k}\": {v}"))
        .collect();
    println!("{{\n{}\n}}", lines.join(",\n"));
}

fn json_output(o: &Opts) -> Result<bool> {
    match o.value("output").unwrap_or("human") {
        "human" => Ok(false),
        "json" => Ok(true),
        other => bail!("--output must be used with human or json as argument (got '{other}')"),
    }
}

fn info_cmd(args: &[String]) -> Result<u8> {
    let o = Opts::parse(
        args,
        &["f", "output", "t", "T"],
        &["backing-chain", "U", "force-share", "limits"],
    )?;
    let file = one_file(&o, "info")?;
    let json = json_output(&o)?;
    let fmt = format_arg(&o, "f")?;
    if o.has("backing-chain") {
        let chain = info::info_chain(&file, fmt)?;
        if json {
            print_json(serde_json::to_string_pretty(&chain))?;
        } else {
            let text: Vec<String> = chain.iter().map(info::human).collect();
            print!("{}", text.join("\n"));
        }
    } else {
        let i = info::info(&file, fmt)?;
        if json {
            print_json(serde_json::to_string_pretty(&i))?;
        } else {
            print!("{}", info::human(&i));
        }
    }
    Ok(0)
}

/// qemu-img check's exit status: 0 clean, 2 corruptions, 3 leaks only.
fn check_status(r: &CheckResult) -> u8 {
    if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    }
}

fn check(args: &[String]) -> Result<u8> {
    let o = Opts::parse(args, &["f", "r", "output", "T"], &["q", "U", "force-share"])?;
    let file = one_file(&o, "check")?;
    let json = json_output(&o)?;
    let repair = match o.value("r") {
        None => None,
        Some("leaks") => Some(Repair::Leaks),
        Some("all") => Some(Repair::All),
        Some(other) => bail!("Invalid option for -r: '{other}' (leaks, all)"),
    };
    let fmt = match format_arg(&o, "f")? {
        Some(f) => f,
        None => probe(&file)?,
    };
    if fmt != Format::Qcow2 {
        eprintln!("qemu-img: This image format does not support checks");
        return Ok(63);
    }
    let q = match Chain::without_backing().open_qcow2(&file, repair.is_none()) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("oxvirt: Could not open '{}': {e}", file.display());
            return Ok(1);
        }
    };
    let r = match diskimg::qcow2::check::check(&q, repair) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("oxvirt: Check failed: {e}");
            return Ok(1);
        }
    };
    if json {
        print_check_json(&file, &r);
    } else {
        print_check_human(&r, o.has("q"));
    }
    Ok(check_status(&r))
}

/// qemu-img leaves out the counters that are zero (check-errors aside).
fn print_check_json(file: &Path, r: &CheckResult) {
    let nonzero = |k: &'static str, v: u64| (v > 0).then(|| (k, serde_json::Value::from(v)));
    let mut f: Vec<(&str, serde_json::Value)> = Vec::new();
    f.extend(nonzero("image-end-offset", r.image_end_offset));
    f.extend(nonzero("total-clusters", r.total_clusters));
    f.push(("check-errors", r.check_errors.into()));
    f.extend(nonzero("leaks", r.leaks));
    f.extend(nonzero("corruptions", r.corruptions));
    f.extend(nonzero("leaks-fixed", r.leaks_fixed));
    f.extend(nonzero("corruptions-fixed", r.corruptions_fixed));
    f.extend(nonzero("allocated-clusters", r.allocated_clusters));
    f.push(("filename", file.display().to_string().into()));
    f.push(("format", "qcow2".into()));
    f.extend(nonzero("fragmented-clusters", r.fragmented_clusters));
    f.extend(nonzero("compressed-clusters", r.compressed_clusters));
    print_object(&f);
}

fn print_check_human(r: &CheckResult, quiet: bool) {
    for m in &r.messages {
        eprintln!("{m}");
    }
    if quiet {
        return;
    }
    if r.leaks_fixed + r.corruptions_fixed > 0 {
        println!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
            r.leaks_fixed, r.corruptions_fixed
        );
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        println!("No errors were found on the image.");
    } else {
        if r.corruptions > 0 {
            println!("\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.", r.corruptions);
        }
        if r.leaks > 0 {
            println!("\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.", r.leaks);
        }
    }
    if r.total_clusters == 0 || r.allocated_clusters == 0 {
        println!("Image end offset: {}", r.image_end_offset);
        return;
    }
    let pct = |n: u64| {
        if r.total_clusters == 0 {
            0.0
        } else {
            n as f64 * 100.0 / r.total_clusters as f64
        }
    };
    let of_alloc = |n: u64| {
        if r.allocated_clusters == 0 {
            0.0
        } else {
            n as f64 * 100.0 / r.allocated_clusters as f64
        }
    };
    println!(
        "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
        r.allocated_clusters,
        r.total_clusters,
        pct(r.allocated_clusters),
        of_alloc(r.fragmented_clusters),
        of_alloc(r.compressed_clusters)
    );
    println!("Image end offset: {}", r.image_end_offset);
}

fn convert(args: &[String]) -> Result<u8> {
    let o = Opts::parse(
        args,
        &["f", "O", "o", "S", "m", "t", "T", "B", "F", "r"],
        &["p", "c", "W", "n", "q", "U"],
    )?;
    if o.positional.len() < 2 {
        bail!("Expecting at least one source and a destination file name");
    }
    let (dest, srcs) = o.positional.split_last().context("missing destination")?;
    let in_fmt = format_arg(&o, "f")?;
    let out_format: Format = o.value("O").unwrap_or("raw").parse()?;
    let mut opts = ConvertOptions {
        out_format,
        compress: o.has("c"),
        no_create: o.has("n"),
        out_of_order: o.has("W"),
        flush: cache_flushes(o.value("t"))?,
        backing: match o.value("B") {
            Some(b) => Some((b.to_string(), format_arg(&o, "F")?)),
            None => None,
        },
        ..Default::default()
    };
    if out_format == Format::Qcow2 {
        qcow2_options(&o, &mut opts.create)?;
    } else if !o.options().is_empty() {
        bail!("Invalid options for format {}", out_format.name());
    }
    if opts.compress && out_format != Format::Qcow2 {
        bail!("Compression not supported for this file format");
    }
    if let Some(s) = o.value("S") {
        opts.min_sparse = parse_size(s)?;
    }
    if let Some(m) = o.value("m") {
        opts.threads = m.parse().ok().filter(|n| (1..=16).contains(n)).with_context(|| format!("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16: '{m}'"))?;
    }
    let sources: Vec<(PathBuf, Option<Format>)> =
        srcs.iter().map(|s| (PathBuf::from(s), in_fmt)).collect();
    let show = o.has("p") && !o.has("q");
    let mut progress = |p: f64| {
        if show {
            print!("    ({p:.2}/100%)\r");
            let _ = std::io::stdout().flush();
        }
    };
    diskimg::ops::convert::convert(&sources, Path::new(dest), &opts, &mut progress)?;
    if show {
        println!();
    }
    Ok(0)
}

/// Whether a `-t` cache mode syncs the target when done; qemu-img's
/// convert default, `unsafe`, does not.
fn cache_flushes(mode: Option<&str>) -> Result<bool> {
    match mode {
        None | Some("unsafe") => Ok(false),
        Some("none" | "writeback" | "writethrough" | "directsync") => Ok(true),
        Some(m) => bail!("Invalid cache option: {m}"),
    }
}

fn compare(args: &[String]) -> Result<u8> {
    let o = Opts::parse(args, &["f", "F", "T"], &["s", "p", "q", "U"])?;
    let [a, b] = o.positional.as_slice() else {
        eprintln!("oxvirt: Expecting two image file names");
        return Ok(2);
    };
    let run = || -> Result<Comparison> {
        let fa = format_arg(&o, "f")?;
        let fb = format_arg(&o, "F")?.or(fa);
        let da = diskimg::open(Path::new(a), true, fa)?;
        let db = diskimg::open(Path::new(b), true, fb)?;
        Ok(diskimg::ops::compare::compare(
            da.as_ref(),
            db.as_ref(),
            o.has("s"),
        )?)
    };
    let quiet = o.has("q");
    match run() {
        Ok(Comparison::Identical) => {
            if !quiet {
                println!("Images are identical.");
            }
            Ok(0)
        }
        Ok(Comparison::ContentMismatch(at)) => {
            if !quiet {
                println!("Content mismatch at offset {at}!");
            }
            Ok(1)
        }
        Ok(Comparison::SizeMismatch) => {
            if !quiet {
                println!("Strict mode: Image size mismatch!");
            }
            Ok(1)
        }
        Ok(Comparison::StatusMismatch(at)) => {
            if !quiet {
                println!("Strict mode: Offset {at} block status mismatch!");
            }
            Ok(1)
        }
        Err(e) => {
            eprintln!("oxvirt: {e:#}");
            Ok(2)
        }
    }
}

fn map(args: &[String]) -> Result<u8> {
    let o = Opts::parse(
        args,
        &["f", "output", "start-offset", "max-length"],
        &["U", "force-share"],
    )?;
    let file = one_file(&o, "map")?;
    let dev = diskimg::open(&file, true, format_arg(&o, "f")?)?;
    let entries = diskimg::ops::map::map(dev.as_ref())?;
    if json_output(&o)? {
        let lines: Vec<String> = entries.iter().map(|e| e.json_line()).collect();
        println!("[{}]", lines.join(",\n"));
    } else {
        println!("{:<19} {:<19} {:<19} File", "Offset", "Length", "Mapped to");
        for e in entries.iter().filter(|e| e.data && e.depth == 0) {
            if let Some(off) = e.offset {
                println!(
                    "{:<#19x} {:<#19x} {:<#19x} {}",
                    e.start,
                    e.length,
                    off,
                    file.display()
                );
            }
        }
    }
    Ok(0)
}

fn resize(args: &[String]) -> Result<u8> {
    let o = Opts::parse(args, &["f", "preallocation"], &["shrink", "q", "U"])?;
    let [file, size] = o.positional.as_slice() else {
        bail!("Expecting image file name and size");
    };
    let file = PathBuf::from(file);
    let fmt = format_arg(&o, "f")?;
    let current = diskimg::open(&file, true, fmt).map(|d| d.size());
    let new = match size.as_bytes().first() {
        Some(b'+') => current?
            .checked_add(parse_size(&size[1..])?)
            .context("size overflow")?,
        Some(b'-') => current?
            .checked_sub(parse_size(&size[1..])?)
            .context("New image size must be positive")?,
        _ => parse_size(size)?,
    };
    diskimg::ops::resize::resize(&file, fmt, new, o.has("shrink"))?;
    if !o.has("q") {
        println!("Image resized.");
    }
    Ok(0)
}

fn snapshot(args: &[String]) -> Result<u8> {
    let o = Opts::parse(args, &["c", "a", "d", "f"], &["l", "q", "U"])?;
    let file = one_file(&o, "snapshot")?;
    let actions = ["l", "c", "a", "d"].iter().filter(|a| o.has(a)).count();
    if actions != 1 {
        bail!("snapshot: give exactly one of -l, -c, -a, -d");
    }
    let q = Chain::without_backing().open_qcow2(&file, o.has("l"))?;
    if o.has("l") {
        let snaps = info::info(&file, Some(Format::Qcow2))?
            .snapshots
            .unwrap_or_default();
        if !snaps.is_empty() {
            print!("Snapshot list:\n{}", info::snapshot_table(&snaps));
        }
    } else if let Some(name) = o.value("c") {
        q.snapshot_create(name)?;
    } else if let Some(name) = o.value("a") {
        q.snapshot_apply(name)?;
    } else if let Some(name) = o.value("d") {
        q.snapshot_delete(name)?;
    }
    Ok(0)
}

fn commit(args: &[String]) -> Result<u8> {
    let o = Opts::parse(args, &["f", "b", "t", "r"], &["d", "p", "q"])?;
    let file = one_file(&o, "commit")?;
    diskimg::ops::commit::commit(&file, o.value("b").map(Path::new), o.has("d"))?;
    if !o.has("q") {
        println!("Image committed.");
    }
    Ok(0)
}

fn rebase(args: &[String]) -> Result<u8> {
    let o = Opts::parse(args, &["f", "b", "F", "t", "T"], &["u", "p", "q", "U"])?;
    let file = one_file(&o, "rebase")?;
    let Some(new) = o.value("b") else {
        bail!("Must specify backing file (-b) or use '-b \"\"' to remove it");
    };
    let new = (!new.is_empty()).then_some(new);
    diskimg::ops::commit::rebase(&file, new, format_arg(&o, "F")?, o.has("u"))?;
    Ok(0)
}

fn measure(args: &[String]) -> Result<u8> {
    let o = Opts::parse(
        args,
        &["f", "O", "o", "size", "output", "l"],
        &["U", "force-share"],
    )?;
    let out_format: Format = o.value("O").unwrap_or("raw").parse()?;
    let mut c = CreateOptions::default();
    if out_format == Format::Qcow2 {
        qcow2_options(&o, &mut c)?;
    }
    let source = match (o.positional.as_slice(), o.value("size")) {
        ([f], None) => Some(diskimg::open(Path::new(f), true, format_arg(&o, "f")?)?),
        ([], Some(_)) => None,
        _ => bail!("Either --size N or one filename must be specified."),
    };
    let size = o.value("size").map(parse_size).transpose()?.unwrap_or(0);
    let m = diskimg::ops::measure::measure(source.as_deref(), size, out_format, &c)?;
    let qcow_source = match o.positional.first() {
        Some(f) => {
            probe(Path::new(f))? == Format::Qcow2 && o.value("f").is_none_or(|f| f == "qcow2")
        }
        None => false,
    };
    if json_output(&o)? {
        let mut f: Vec<(&str, serde_json::Value)> = Vec::new();
        if qcow_source && out_format == Format::Qcow2 {
            f.push(("bitmaps", 0.into()));
        }
        f.push(("required", m.required.into()));
        f.push(("fully-allocated", m.fully_allocated.into()));
        print_object(&f);
    } else {
        println!(
            "required size: {}\nfully allocated size: {}",
            m.required, m.fully_allocated
        );
        if qcow_source && out_format == Format::Qcow2 {
            println!("bitmaps size: 0");
        }
    }
    Ok(0)
}
