/// Returns true when `ok`; otherwise prints a loud SKIP naming `what` and
/// returns false, or panics when `OXVIRT_REQUIRE_KVM=1` (CI) forbids skipping.
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("OXVIRT_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("prerequisite missing and OXVIRT_REQUIRE_KVM=1 forbids skipping: {what}");
    }
    eprintln!("\n********** SKIP: {what} **********\n");
    false
}

/// `/dev/kvm` can be opened for reading and writing.
pub fn require_kvm() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    require(ok, "/dev/kvm is missing or not accessible")
}

/// The test runs as root (cgroups, taps, network namespaces).
pub fn require_root() -> bool {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        });
    require(uid.as_deref() == Some("0"), "not running as root")
}
