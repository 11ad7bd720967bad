//! The kernel's list format for CPU and memory-node sets (`0-3,5`).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// The largest CPU or node number accepted (the kernel's NR_CPUS ceiling).
const MAX_ID: u32 = 8191;

/// A set of CPU (or NUMA node) numbers, as in `cpuset.cpus` and Docker's
/// `--cpuset-cpus`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuList(BTreeSet<u32>);

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid CPU list {input:?}: {reason}")]
pub struct CpuListError {
    pub input: String,
    pub reason: String,
}

impl CpuList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, id: u32) -> bool {
        self.0.contains(&id)
    }

    pub fn is_subset(&self, other: &CpuList) -> bool {
        self.0.is_subset(&other.0)
    }

    pub fn intersection(&self, other: &CpuList) -> CpuList {
        CpuList(self.0.intersection(&other.0).copied().collect())
    }

    pub fn union(&self, other: &CpuList) -> CpuList {
        CpuList(self.0.union(&other.0).copied().collect())
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }
}

impl FromIterator<u32> for CpuList {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        CpuList(iter.into_iter().collect())
    }
}

impl FromStr for CpuList {
    type Err = CpuListError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| CpuListError {
            input: input.to_owned(),
            reason,
        };
        let mut set = BTreeSet::new();
        for item in input.trim().split(',').filter(|s| !s.is_empty()) {
            let (lo, hi) = item.split_once('-').unwrap_or((item, item));
            let number = |s: &str| {
                s.trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|n| *n <= MAX_ID)
                    .ok_or_else(|| err(format!("{s:?} is not a number from 0 to {MAX_ID}")))
            };
            let (lo, hi) = (number(lo)?, number(hi)?);
            if lo > hi {
                return Err(err(format!("range {item:?} runs backwards")));
            }
            set.extend(lo..=hi);
        }
        Ok(CpuList(set))
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids = self.0.iter().copied().peekable();
        let mut first = true;
        while let Some(lo) = ids.next() {
            let mut hi = lo;
            while ids.peek() == Some(&(hi + 1)) {
                hi = ids.next().unwrap_or(hi);
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_ranges() {
        let list: CpuList = "0-3,5,7-8".parse().unwrap();
        assert_eq!(list.iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 5, 7, 8]);
        assert_eq!(list.to_string(), "0-3,5,7-8");
        assert_eq!("1,0".parse::<CpuList>().unwrap().to_string(), "0-1");
        assert!("\n".parse::<CpuList>().unwrap().is_empty());
    }

    #[test]
    fn rejects_bad_lists() {
        for bad in ["a", "3-1", "0-", "-1", "99999", "1,,x"] {
            let err = bad.parse::<CpuList>().expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
}
