//! virsh-shaped output.

use daemon::blkio::{BlkioTune, BlockStats, InterfaceStats};
use daemon::devices::DiskThrottle;
use daemon::manager::{DomainInfo, DomainSummary};
use daemon::settings::{Sizing, VcpuPin};
use daemon::snapshot::SnapshotInfo;
use daemon::tune::{MemTune, SchedInfo};

pub fn list(domains: &[DomainSummary], names_only: bool) {
    if names_only {
        for d in domains {
            println!("{}", d.name);
        }
        return;
    }
    println!(" {:<8} {:<30} State", "Id", "Name");
    println!("{}", "-".repeat(50));
    for d in domains {
        let id = d.pid.map_or("-".to_owned(), |p| p.to_string());
        println!(" {id:<8} {:<30} {}", d.name, d.state);
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or("-".to_owned(), |v| v.to_string())
}

pub fn dominfo(i: &DomainInfo) {
    let yes_no = |b: bool| if b { "enable" } else { "disable" };
    println!("{:<16}{}", "Id:", opt(i.pid));
    println!("{:<16}{}", "Name:", i.name);
    println!("{:<16}{}", "State:", i.state);
    println!("{:<16}{}", "Reason:", i.reason);
    println!("{:<16}{}", "CPU(s):", i.vcpus);
    if let Some(ns) = i.cpu_time_ns {
        println!("{:<16}{:.1}s", "CPU time:", ns as f64 / 1e9);
    }
    println!("{:<16}{} KiB", "Max memory:", i.memory / 1024);
    println!(
        "{:<16}{}",
        "Memory limit:",
        i.memory_limit
            .map_or("unlimited".to_owned(), |l| format!("{} KiB", l / 1024))
    );
    if let Some(used) = i.memory_usage {
        println!("{:<16}{} KiB", "Used memory:", used / 1024);
    }
    if let Some(oom) = i.oom_kills {
        println!("{:<16}{}", "OOM kills:", oom);
    }
    println!(
        "{:<16}{}",
        "Persistent:",
        if i.persistent { "yes" } else { "no" }
    );
    println!("{:<16}{}", "Autostart:", yes_no(i.autostart));
    println!(
        "{:<16}{}",
        "Managed save:",
        if i.managed_save { "yes" } else { "no" }
    );
    if let Some(code) = i.exit_code {
        println!("{:<16}{}", "Exit status:", code);
    }
    println!("{:<16}{}", "Console log:", i.console_log.display());
}

pub fn schedinfo(s: &SchedInfo) {
    println!("{:<15}: posix", "Scheduler");
    println!("{:<15}: {}", "cpu_shares", opt(s.cpu_shares));
    println!("{:<15}: {}", "vcpu_period", opt(s.vcpu_period));
    println!("{:<15}: {}", "vcpu_quota", opt(s.vcpu_quota));
}

/// virsh prints KiB, and "unlimited" for no limit.
fn kib(v: Option<i64>) -> String {
    match v {
        Some(n) if n >= 0 => (n / 1024).to_string(),
        _ => "unlimited".to_owned(),
    }
}

pub fn memtune(m: &MemTune) {
    println!("{:<15}: {}", "hard_limit", kib(m.hard_limit));
    println!("{:<15}: {}", "soft_limit", kib(m.soft_limit));
    println!("{:<15}: {}", "swap_hard_limit", kib(m.swap_hard_limit));
}

pub fn vcpupin(pins: &[VcpuPin]) {
    println!(" {:<6} CPU Affinity", "VCPU");
    println!("{}", "-".repeat(22));
    for p in pins {
        let list = if p.cpulist.is_empty() {
            "*"
        } else {
            &p.cpulist
        };
        println!(" {:<6} {list}", p.vcpu);
    }
}

pub fn sizing(s: &Sizing) {
    println!("{:<16}{}", "CPU(s):", opt(s.vcpus));
    println!(
        "{:<16}{} KiB",
        "Used memory:",
        opt(s.memory.map(|m| m / 1024))
    );
    println!(
        "{:<16}{} KiB",
        "Max memory:",
        opt(s.max_memory.map(|m| m / 1024))
    );
}

/// virsh's snapshot-list, with whether the guest's memory is in it.
pub fn snapshots(list: &[SnapshotInfo]) {
    println!(
        " {:<20} {:<26} {:<9} Memory",
        "Name", "Creation Time", "State"
    );
    println!("{}", "-".repeat(66));
    for s in list {
        let memory = if s.memory.is_some() { "yes" } else { "no" };
        println!(
            " {:<20} {:<26} {:<9} {memory}",
            s.name,
            utc(s.created_at),
            s.state
        );
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS +0000`.
fn utc(secs: u64) -> String {
    format!("{} +0000", utc_time(secs))
}

/// `2026-11-23 05:40:09` (UTC) from Unix seconds.
pub(super) fn utc_time(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

pub fn blkdeviotune(t: &DiskThrottle) {
    let v = |x: Option<u64>| x.unwrap_or(0);
    println!("{:<15}: {}", "total_bytes_sec", v(t.total_bps));
    println!("{:<15}: {}", "read_bytes_sec", v(t.read_bps));
    println!("{:<15}: {}", "write_bytes_sec", v(t.write_bps));
    println!("{:<15}: {}", "total_iops_sec", v(t.total_iops));
    println!("{:<15}: {}", "read_iops_sec", v(t.read_iops));
    println!("{:<15}: {}", "write_iops_sec", v(t.write_iops));
}

/// virsh's `DEVICE,N,DEVICE,N` lists.
fn device_list(list: &[String]) -> String {
    list.iter()
        .map(|e| {
            e.rsplit_once(':')
                .map_or(e.clone(), |(d, n)| format!("{d},{n}"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

pub fn blkiotune(t: &BlkioTune) {
    println!("{:<22}: {}", "weight", opt(t.weight));
    println!(
        "{:<22}: {}",
        "device_read_bytes_sec",
        device_list(&t.device_read_bps)
    );
    println!(
        "{:<22}: {}",
        "device_write_bytes_sec",
        device_list(&t.device_write_bps)
    );
    println!(
        "{:<22}: {}",
        "device_read_iops_sec",
        device_list(&t.device_read_iops)
    );
    println!(
        "{:<22}: {}",
        "device_write_iops_sec",
        device_list(&t.device_write_iops)
    );
}

pub fn domblkstat(stats: &[BlockStats]) {
    for s in stats {
        for (key, value) in [
            ("rd_req", s.rd_req),
            ("rd_bytes", s.rd_bytes),
            ("wr_req", s.wr_req),
            ("wr_bytes", s.wr_bytes),
            ("flush_operations", s.flush_operations),
            ("rd_total_times", s.rd_total_times),
            ("wr_total_times", s.wr_total_times),
            ("flush_total_times", s.flush_total_times),
            ("errs", s.errs),
        ] {
            println!("{} {key} {value}", s.disk);
        }
    }
}

pub fn domifstat(s: &InterfaceStats) {
    for (key, value) in [
        ("rx_bytes", s.rx_bytes),
        ("rx_packets", s.rx_packets),
        ("rx_errs", s.rx_errs),
        ("rx_drop", s.rx_drop),
        ("tx_bytes", s.tx_bytes),
        ("tx_packets", s.tx_packets),
        ("tx_errs", s.tx_errs),
        ("tx_drop", s.tx_drop),
    ] {
        println!("{} {key} {value}", s.interface);
    }
}

/// domjobinfo from the VMM's query-migrate.
pub fn jobinfo(info: &serde_json::Value) {
    let status = info["status"].as_str().unwrap_or("none");
    let kind = match status {
        "none" => "None",
        "active" | "setup" | "pre-switchover" | "device" => "Unbounded",
        "completed" => "Completed",
        _ => "Failed",
    };
    println!("{:<22}{kind}", "Job type:");
    println!("{:<22}{status}", "Status:");
    let ms = |key: &str| info[key].as_u64().map(|v| format!("{v} ms"));
    let mib = |v: &serde_json::Value| {
        v.as_u64()
            .map(|b| format!("{:.3} MiB", b as f64 / 1048576.0))
    };
    for (label, value) in [
        ("Time elapsed:", ms("total-time")),
        ("Expected downtime:", ms("expected-downtime")),
        ("Downtime:", ms("downtime")),
        ("Data processed:", mib(&info["ram"]["transferred"])),
        ("Data remaining:", mib(&info["ram"]["remaining"])),
        ("Data total:", mib(&info["ram"]["total"])),
    ] {
        if let Some(value) = value {
            println!("{label:<22}{value}");
        }
    }
}
