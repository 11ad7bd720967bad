//! Named network namespaces (`ip netns`), and running code inside one.

use std::fs::File;
use std::path::PathBuf;

use nix::sched::{setns, CloneFlags};

use super::command::run;
use super::NetError;

/// A named network namespace, as `ip netns add` makes it (a bind mount
/// under /run/netns). Deleting it is explicit: a VM's or a test's
/// namespace outlives this handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a new, empty namespace (only `lo`, down).
    pub fn create(name: &str) -> Result<Self, NetError> {
        validate(name)?;
        run("ip", &["netns", "add", name], None)?;
        tracing::info!(netns = name, "created network namespace");
        Ok(NetNs {
            name: name.to_owned(),
        })
    }

    /// An existing namespace.
    pub fn open(name: &str) -> Result<Self, NetError> {
        validate(name)?;
        let ns = NetNs {
            name: name.to_owned(),
        };
        if !ns.path().exists() {
            return Err(NetError::NoNetns {
                name: name.to_owned(),
            });
        }
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Deletes the namespace; its interfaces go with it (a veth's peer in
    /// another namespace too).
    pub fn delete(&self) -> Result<(), NetError> {
        run("ip", &["netns", "delete", &self.name], None)?;
        tracing::info!(netns = %self.name, "deleted network namespace");
        Ok(())
    }

    /// Runs `f` on a thread that has entered this namespace: sockets and tap
    /// devices it opens belong to the namespace and stay usable from any
    /// thread afterwards.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
        let file = File::open(self.path()).map_err(|source| NetError::Open {
            path: self.path(),
            source,
        })?;
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetError::EnterNetns {
                    name: self.name.clone(),
                    source,
                })?;
                Ok(f())
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

fn validate(name: &str) -> Result<(), NetError> {
    let bad = |reason| NetError::BadName {
        kind: "network namespace",
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name == "." || name == ".." {
        return Err(bad("it is empty, . or .."));
    }
    if name.len() > 64 {
        return Err(bad("it is longer than 64 bytes"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(bad("only letters, digits, '-', '_' and '.' are allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", "..", "a/b", "a b", &"n".repeat(65)] {
            assert!(
                matches!(validate(bad), Err(NetError::BadName { .. })),
                "{bad}"
            );
        }
        assert!(validate("oxvirt-test_1.a").is_ok());
        let err = NetNs::open("oxvirt-no-such-ns").unwrap_err();
        assert!(err.to_string().contains("oxvirt-no-such-ns"), "{err}");
    }
}
