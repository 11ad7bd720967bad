//! `oxvirt cloud-localds` checked by real readers: blkid, isoinfo (Rock
//! Ridge and Joliet), libarchive's bsdtar, the kernel's isofs (root, a
//! kernel with iso9660), each compared with what Debian's cloud-localds
//! (genisoimage) makes of the same files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const OXVIRT: &str = env!("CARGO_BIN_EXE_oxvirt");

/// A folder of the test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "oxvirt-cloud-localds-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Inputs {
    dir: TempDir,
}

impl Inputs {
    /// user-data over several sectors, and files with bytes a text-mode
    /// reader would mangle.
    fn new() -> Self {
        let dir = TempDir::new();
        let mut user = b"#cloud-config\nhostname: seeded\n".to_vec();
        for i in 0..300 {
            user.extend_from_slice(format!("# line {i} of padding\n").as_bytes());
        }
        std::fs::write(dir.path().join("user-data"), user).unwrap();
        std::fs::write(dir.path().join("meta-data"), "instance-id: i-42\r\n").unwrap();
        std::fs::write(
            dir.path().join("network-config"),
            "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n",
        )
        .unwrap();
        let vendor: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        std::fs::write(dir.path().join("vendor-data"), vendor).unwrap();
        Inputs { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap()
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn oxvirt_seed(inputs: &Inputs, out: &Path) {
    let o = run(Command::new(OXVIRT)
        .arg("cloud-localds")
        .arg("-N")
        .arg(inputs.path("network-config"))
        .arg("-V")
        .arg(inputs.path("vendor-data"))
        .arg(out)
        .arg(inputs.path("user-data"))
        .arg(inputs.path("meta-data")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    testkit::require(
        found,
        &format!("{tool} is not installed (scripts/apt-packages.txt)"),
    )
}

const NAMES: [&str; 4] = ["meta-data", "network-config", "user-data", "vendor-data"];

#[test]
fn seed_reads_back_through_blkid_and_isoinfo() {
    if !have("isoinfo") || !have("blkid") {
        return;
    }
    let inputs = Inputs::new();
    let iso = inputs.path("seed.iso");
    oxvirt_seed(&inputs, &iso);
    let o = run(Command::new("blkid").args(["-p", "-o", "export"]).arg(&iso));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("TYPE=iso9660"), "{text}");
    assert!(text.contains("LABEL=cidata"), "{text}");
    for mode in ["-R", "-J"] {
        let o = run(Command::new("isoinfo").args(["-l", mode, "-i"]).arg(&iso));
        let listing = String::from_utf8_lossy(&o.stdout);
        for name in NAMES {
            assert!(
                listing
                    .lines()
                    .any(|l| l.trim_end().ends_with(&format!(" {name}"))),
                "{mode}: {name} missing in\n{listing}"
            );
            let o = run(Command::new("isoinfo")
                .args([mode, "-i"])
                .arg(&iso)
                .args(["-x", &format!("/{name}")]));
            assert!(o.status.success(), "{mode} -x /{name}");
            assert_eq!(o.stdout, inputs.read(name), "{mode}: /{name} differs");
        }
    }
    let o = run(Command::new("isoinfo").args(["-d", "-i"]).arg(&iso));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("Volume id: cidata"), "{text}");
    assert!(text.contains("Joliet with UCS level 3 found"), "{text}");
    assert!(
        text.contains("Rock Ridge signatures version 1 found"),
        "{text}"
    );
}

type Files = Vec<(String, Vec<u8>)>;

/// Each file of the folder `dir` with its bytes, by name.
fn files_in(dir: &Path) -> Files {
    let mut files: Files = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// Extracts `iso` with libarchive (bsdtar) and returns its files.
fn extracted_files(iso: &Path, at: &Path) -> Files {
    std::fs::create_dir_all(at).unwrap();
    let o = run(Command::new("bsdtar").arg("-xf").arg(iso).arg("-C").arg(at));
    assert!(
        o.status.success(),
        "bsdtar: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    files_in(at)
}

/// Our seed and Debian cloud-localds's of the same inputs, read by
/// libarchive: ours holds every input byte for byte, and every file theirs
/// holds is the same in ours. (The kernel's isofs is not built into this
/// machine's kernel, so libarchive is the independent reader here.)
fn compare_with_cloud_localds() {
    let inputs = Inputs::new();
    let ours = inputs.path("ours.iso");
    oxvirt_seed(&inputs, &ours);
    let theirs = inputs.path("theirs.iso");
    let o = run(Command::new("cloud-localds")
        .arg("-N")
        .arg(inputs.path("network-config"))
        .arg(&theirs)
        .arg(inputs.path("user-data"))
        .arg(inputs.path("meta-data")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let our_files = extracted_files(&ours, &inputs.path("read-ours"));
    let names: Vec<&str> = our_files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, NAMES);
    for (name, data) in &our_files {
        assert_eq!(data, &inputs.read(name), "{name} differs once read back");
    }
    // Debian's cloud-localds drops -V (its option parser does not shift
    // the argument), so compare the files it does write.
    let their_files = extracted_files(&theirs, &inputs.path("read-theirs"));
    assert_eq!(their_files.len(), 3, "{their_files:?}");
    for (name, data) in &their_files {
        let ours = our_files.iter().find(|(n, _)| n == name);
        assert_eq!(ours.map(|(_, d)| d), Some(data), "{name}");
    }
}

#[test]
fn libarchive_reads_the_same_files_as_from_debian_cloud_localds() {
    if have("bsdtar") && have("cloud-localds") && have("genisoimage") {
        compare_with_cloud_localds();
    }
}

#[test]
fn default_meta_data_matches_cloud_localds() {
    let inputs = Inputs::new();
    let iso = inputs.path("seed.iso");
    let o = run(Command::new(OXVIRT)
        .args(["cloud-localds", "-H", "web1"])
        .arg(&iso)
        .arg(inputs.path("user-data")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    if !have("isoinfo") {
        return;
    }
    let meta = run(Command::new("isoinfo")
        .args(["-R", "-i"])
        .arg(&iso)
        .args(["-x", "/meta-data"]));
    assert_eq!(
        String::from_utf8_lossy(&meta.stdout),
        "{\n\"instance-id\": \"iid-local01\",\n\"local-hostname\": \"web1\"\n}\n"
    );
    if !have("cloud-localds") {
        return;
    }
    let theirs = inputs.path("theirs.iso");
    run(Command::new("cloud-localds")
        .args(["-H", "web1"])
        .arg(&theirs)
        .arg(inputs.path("user-data")));
    let their_meta = run(Command::new("isoinfo")
        .args(["-R", "-i"])
        .arg(&theirs)
        .args(["-x", "/meta-data"]));
    assert_eq!(meta.stdout, their_meta.stdout);
}

#[test]
fn user_data_from_stdin() {
    if !have("isoinfo") {
        return;
    }
    let inputs = Inputs::new();
    let iso = inputs.path("seed.iso");
    let o = run(Command::new("sh").args([
        "-c",
        &format!(
            "printf '#cloud-config\\n' | {OXVIRT} cloud-localds {} -",
            iso.display()
        ),
    ]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let user = run(Command::new("isoinfo")
        .args(["-J", "-i"])
        .arg(&iso)
        .args(["-x", "/user-data"]));
    assert_eq!(user.stdout, b"#cloud-config\n");
}

/// Runs `oxvirt cloud-localds ARGS` expecting failure; returns stderr.
fn refused(args: &[&std::ffi::OsStr]) -> String {
    let o = run(Command::new(OXVIRT).arg("cloud-localds").args(args));
    assert!(!o.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn hostile_inputs_are_named_and_leave_no_output() {
    let inputs = Inputs::new();
    let out = inputs.path("out.iso");
    let os = |p: &Path| p.as_os_str().to_owned();
    let missing = inputs.path("no-such-user-data");
    let err = refused(&[&os(&out), &os(&missing)]);
    assert!(
        err.contains("no-such-user-data") && err.contains("No such file"),
        "{err}"
    );
    let err = refused(&[&os(&out), &os(inputs.dir.path())]);
    assert!(err.contains("not a regular file"), "{err}");
    let big = inputs.path("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len((64 << 20) + 1)
        .unwrap();
    let err = refused(&[&os(&out), &os(&inputs.path("user-data")), &os(&big)]);
    assert!(
        err.contains("big") && err.contains("67108864-byte limit"),
        "{err}"
    );
    let err = refused(&[
        "-H".as_ref(),
        "x".as_ref(),
        &os(&out),
        &os(&inputs.path("user-data")),
        &os(&inputs.path("meta-data")),
    ]);
    assert!(err.contains("incompatible"), "{err}");
    let err = refused(&[
        "-d".as_ref(),
        "qcow2".as_ref(),
        &os(&out),
        &os(&inputs.path("user-data")),
    ]);
    assert!(err.contains("--disk-format qcow2"), "{err}");
    let nowhere = inputs.path("no-dir/out.iso");
    let err = refused(&[&os(&nowhere), &os(&inputs.path("user-data"))]);
    assert!(err.contains("no-dir"), "{err}");
    assert!(!out.exists(), "a refused run left {out:?}");
}

#[test]
fn a_failed_write_leaves_no_partial_file_and_keeps_the_old_one() {
    let inputs = Inputs::new();
    let out = inputs.path("seed.iso");
    std::fs::write(&out, "previous seed").unwrap();
    // 40 KiB of file size allowed: the image is larger, so a write fails
    // with EFBIG (SIGXFSZ ignored) part way.
    let o = run(Command::new("bash").args([
        "-c",
        &format!(
            "trap '' XFSZ; ulimit -f 40; exec {OXVIRT} cloud-localds {} {}",
            out.display(),
            inputs.path("user-data").display()
        ),
    ]));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("seed.iso") && err.contains("too large"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"previous seed");
    let leftovers: Vec<_> = std::fs::read_dir(inputs.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
