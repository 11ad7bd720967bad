//! Shared by the `oxvirt vmm` integration tests: the binary, a tiny
//! assembled PVH guest for the exit paths the probe guest has no workload
//! for (power-off, i8042 reset, triple fault), and run helpers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use testkit::VmRun;

pub fn oxvirt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_oxvirt"))
}

/// `oxvirt vmm --kernel KERNEL ARGS`, not started.
pub fn vmm_command<S: AsRef<std::ffi::OsStr>>(kernel: &Path, args: &[S]) -> Command {
    let mut command = oxvirt();
    command.arg("vmm").arg("--kernel").arg(kernel).args(args);
    command
}

/// Runs a helper tool that must succeed (`ip`, `qemu-img`).
pub fn tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `oxvirt vmm` with `args`, run to its end (killed after `timeout`).
pub fn vmm(args: &[&str], timeout: Duration) -> VmRun {
    let mut cmd = oxvirt();
    cmd.arg("vmm").args(args);
    testkit::run_vm(cmd, timeout)
}

/// The probe guest on oxvirt with `cmdline`, 64 MiB and `vcpus`.
pub fn probe(cmdline: &str, vcpus: u32) -> VmRun {
    let kernel = testkit::probe_kernel();
    let vcpus = vcpus.to_string();
    vmm(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--memory",
            "64M",
            "--vcpus",
            &vcpus,
        ],
        Duration::from_secs(60),
    )
}

/// A 32-bit PVH guest that acts on the first letter of its command line:
/// `p` ACPI power-off (S5 to port 0x600), `k` i8042 reset (0xfe to port
/// 0x64), `t` triple fault (#UD with an empty IDT), `dN` debug-exit N.
/// It prints `T` on COM1 first, and halts when the action returns.
const TINY_GUEST: &str = r#"
.section .note.Xen, "a", @note
  .long 4, 4, 18
  .asciz "Xen"
  .long _start
.text
.code32
.globl _start
_start:
  mov $0x3f8, %dx
  mov $'T', %al
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
  mov 24(%ebx), %esi      /* hvm_start_info.cmdline_paddr */
  movb (%esi), %al
  cmp $'p', %al
  je poweroff
  cmp $'k', %al
  je kbdreset
  cmp $'t', %al
  je triple
  cmp $'d', %al
  je debugexit
  jmp hang
poweroff:
  mov $0x34, %al
  mov $0x600, %dx
  out %al, %dx
  jmp hang
kbdreset:
  mov $0xfe, %al
  out %al, $0x64
  jmp hang
triple:
  lidt empty_idt
  ud2
debugexit:
  movzbl 1(%esi), %eax
  sub $'0', %eax
  out %eax, $0xf4
hang:
  hlt
  jmp hang
empty_idt:
  .word 0
  .long 0
"#;

/// Assembles and links the tiny guest once per test process.
pub fn tiny_guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let dir = testkit::target_dir().join(format!("vmm-tiny-guest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("tiny.S");
        std::fs::write(&src, TINY_GUEST).unwrap();
        let obj = dir.join("tiny.o");
        let elf = dir.join("tiny.elf");
        let ok = Command::new("as")
            .args(["--64", "-o"])
            .arg(&obj)
            .arg(&src)
            .status()
            .unwrap()
            .success()
            && Command::new("ld")
                .args(["-Ttext=0x100000", "-e", "_start", "-o"])
                .arg(&elf)
                .arg(&obj)
                .status()
                .unwrap()
                .success();
        assert!(
            ok,
            "assembling the tiny guest failed (binutils `as`/`ld` needed)"
        );
        elf
    })
}

/// A temporary folder for one test, removed by the caller at the end.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("oxvirt-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `oxvirt vmm` with its console in a file and a connected client.
pub struct Session {
    pub child: Child,
    console: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events read while waiting for a reply, oldest first.
    events: Vec<Value>,
    dir: PathBuf,
}

impl Session {
    /// Starts `oxvirt vmm --kernel KERNEL ARGS` with its console in a file
    /// and its control socket connected.
    pub fn start<S: AsRef<std::ffi::OsStr>>(name: &str, kernel: &Path, args: &[S]) -> Session {
        Session::spawn(name, vmm_command(kernel, args))
    }

    /// Runs `command` (an `oxvirt vmm` command line, possibly behind a
    /// wrapper such as `ip netns exec`) with `--serial` and `--api` added.
    pub fn spawn(name: &str, mut command: Command) -> Session {
        let dir = temp_dir(name);
        let console = dir.join("console.txt");
        let api = dir.join("api.sock");
        let child = command
            .arg("--serial")
            .arg(format!("file:{}", console.display()))
            .arg("--api")
            .arg(&api)
            .stdin(Stdio::null())
            .spawn()
            .expect("start oxvirt vmm");
        let stream = connect(&api);
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let greeting = read_json(&mut reader);
        assert!(greeting.get("QMP").is_some(), "greeting {greeting}");
        Session {
            child,
            console,
            reader,
            writer: stream,
            events: Vec::new(),
            dir,
        }
    }

    pub fn send_raw(&mut self, line: &str) -> Value {
        self.writer.write_all(line.as_bytes()).unwrap();
        self.writer.write_all(b"\n").unwrap();
        self.next_reply()
    }

    pub fn execute(&mut self, command: &str) -> Value {
        self.send_raw(&json!({"execute": command}).to_string())
    }

    /// Runs `command` with `arguments`.
    pub fn execute_with(&mut self, command: &str, arguments: Value) -> Value {
        self.send_raw(&json!({"execute": command, "arguments": arguments}).to_string())
    }

    /// A command's `return` value; panics on an error reply.
    pub fn ok(&mut self, command: &str, arguments: Value) -> Value {
        let reply = self.execute_with(command, arguments);
        reply
            .get("return")
            .cloned()
            .unwrap_or_else(|| panic!("{command}: {reply}"))
    }

    /// The next reply line; events on the way are kept for `wait_event`.
    pub fn next_reply(&mut self) -> Value {
        loop {
            let v = read_json(&mut self.reader);
            if v.get("event").is_none() {
                return v;
            }
            self.events.push(v);
        }
    }

    /// Takes the event `name` (already received, or the next one to come).
    pub fn wait_event(&mut self, name: &str) -> Value {
        let is = |v: &Value| v.get("event").and_then(Value::as_str) == Some(name);
        if let Some(i) = self.events.iter().position(is) {
            return self.events.remove(i);
        }
        loop {
            let v = read_json(&mut self.reader);
            if is(&v) {
                return v;
            }
        }
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    pub fn count(&self, needle: &str) -> usize {
        self.console().matches(needle).count()
    }

    /// Waits until the console holds at least `n` of `needle`.
    pub fn wait_count(&self, needle: &str, n: usize, timeout: Duration) {
        let start = Instant::now();
        while self.count(needle) < n {
            assert!(
                start.elapsed() < timeout,
                "waited {timeout:?} for {n} x {needle:?}; console:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_exit(mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status.code();
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = std::fs::remove_dir_all(&self.dir);
        status
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(path: &Path) -> UnixStream {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                return s;
            }
            Err(e) if start.elapsed() > Duration::from_secs(20) => panic!("connect {path:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn read_json(reader: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .expect("read from the control socket");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
}
