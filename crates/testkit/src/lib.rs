//! Test support shared by the workspace's integration tests.
//!
//! One place for: where built artifacts and peer programs live, the rule for
//! skipping a test whose prerequisite is missing, free ports, network
//! namespaces, and parsing the
//! probe guest's output.

mod netns;
mod paths;
mod probe;
mod qemu;
mod skip;

pub use netns::Namespaces;
pub use paths::{peer_dir, probe_binary, target_dir, workspace_root};
pub use probe::{ProbeOutput, ProbeResult};
pub use qemu::{
    probe_kernel, probe_kernel_virtio, qemu_binary, qemu_firmware_dir, require_qemu, run_vm,
    Microvm, VmRun,
};
pub use skip::{require, require_kvm, require_root};

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}
