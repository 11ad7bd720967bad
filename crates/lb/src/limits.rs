//! `limit_conn_zone` / `limit_conn`: concurrent sessions per key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::vars::Template;

/// One named zone: a counter per key (for example per client address).
#[derive(Debug)]
pub struct Zone {
    pub name: String,
    pub key: Template,
    counts: Mutex<HashMap<String, u32>>,
}

#[derive(Debug, thiserror::Error)]
#[error("limit_conn zone \"{zone}\": all {limit} slots for this key are taken")]
pub struct LimitReached {
    pub zone: String,
    pub limit: u32,
}

/// Holds one slot in a zone; gives it back when dropped.
#[derive(Debug)]
pub struct Slot {
    zone: Arc<Zone>,
    key: String,
}

impl Zone {
    pub fn new(name: &str, key: Template) -> Zone {
        Zone {
            name: name.to_string(),
            key,
            counts: Mutex::new(HashMap::new()),
        }
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<String, u32>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot for `key` unless `limit` are already taken. Empty keys are
    /// not limited, as in nginx.
    pub fn acquire(
        self: &Arc<Self>,
        key: String,
        limit: u32,
    ) -> Result<Option<Slot>, LimitReached> {
        if key.is_empty() {
            return Ok(None);
        }
        let mut counts = self.counts();
        let n = counts.entry(key.clone()).or_insert(0);
        if *n >= limit {
            return Err(LimitReached {
                zone: self.name.clone(),
                limit,
            });
        }
        *n += 1;
        Ok(Some(Slot {
            zone: self.clone(),
            key,
        }))
    }

    /// Keys currently holding at least one slot (bounded by live sessions).
    pub fn len(&self) -> usize {
        self.counts().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.zone.counts();
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_returned() {
        let zone = Arc::new(Zone::new(
            "perip",
            Template::parse("$binary_remote_addr").unwrap(),
        ));
        let a = zone.acquire("k".into(), 2).unwrap();
        let b = zone.acquire("k".into(), 2).unwrap();
        assert!(zone.acquire("k".into(), 2).is_err());
        assert!(zone.acquire("other".into(), 2).unwrap().is_some());
        assert!(zone.acquire(String::new(), 0).unwrap().is_none());
        drop(a);
        let c = zone.acquire("k".into(), 2).unwrap();
        drop((b, c));
        assert!(
            zone.is_empty(),
            "keys without sessions must not stay in memory"
        );
    }
}
