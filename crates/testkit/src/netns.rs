//! Network namespaces a test creates: the guard deletes them (and with them
//! every interface and nftables table inside) even when the test fails.

use std::sync::atomic::{AtomicU32, Ordering};

use host::net::NetNs;

#[derive(Default)]
pub struct Namespaces(Vec<NetNs>);

impl Namespaces {
    /// A new namespace, named after this test process and `role`.
    pub fn add(&mut self, role: &str) -> NetNs {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let ns = NetNs::create(&format!("oxvirt-t{}-{n}-{role}", std::process::id()))
            .expect("create netns");
        self.0.push(ns.clone());
        ns
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            if let Err(e) = ns.delete() {
                eprintln!("cleanup: {e}");
            }
        }
    }
}
