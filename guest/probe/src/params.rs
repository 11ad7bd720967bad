//! The job, from the kernel command line: `probe=<workload>` and
//! `probe.<key>=<value>` words. Other words (console=..., anything a VMM or
//! a person adds) are ignored, so the same command line boots Linux too.

use core::fmt;

const MAX_PARAMS: usize = 16;

#[derive(Debug, PartialEq)]
pub enum ParamError<'a> {
    NoWorkload,
    TooMany,
    Unknown {
        workload: &'a str,
        key: &'a str,
        known: &'static [&'static str],
    },
    NotANumber {
        key: &'static str,
        value: &'a str,
    },
    OutOfRange {
        key: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
}

impl fmt::Display for ParamError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::NoWorkload => write!(f, "no probe=<workload> on the command line"),
            Self::TooMany => write!(f, "more than {MAX_PARAMS} probe.<key>=<value> parameters"),
            Self::Unknown {
                workload,
                key,
                known,
            } => {
                write!(
                    f,
                    "unknown parameter probe.{key} for workload {workload} (known:"
                )?;
                for k in known.iter() {
                    write!(f, " {k}")?;
                }
                write!(f, ")")
            }
            Self::NotANumber { key, value } => {
                write!(
                    f,
                    "probe.{key}={value} is not a non-negative decimal integer"
                )
            }
            Self::OutOfRange {
                key,
                value,
                min,
                max,
            } => {
                write!(f, "probe.{key}={value} is out of range {min}..={max}")
            }
        }
    }
}

pub struct Params<'a> {
    pub workload: &'a str,
    pairs: [(&'a str, &'a str); MAX_PARAMS],
    count: usize,
}

impl<'a> Params<'a> {
    pub fn parse(cmdline: &'a str) -> Result<Self, ParamError<'a>> {
        let mut params = Params {
            workload: "",
            pairs: [("", ""); MAX_PARAMS],
            count: 0,
        };
        for word in cmdline.split_ascii_whitespace() {
            if let Some(workload) = word.strip_prefix("probe=") {
                params.workload = workload;
            } else if let Some(pair) = word.strip_prefix("probe.") {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                if params.count == MAX_PARAMS {
                    return Err(ParamError::TooMany);
                }
                params.pairs[params.count] = (key, value);
                params.count += 1;
            }
        }
        if params.workload.is_empty() {
            return Err(ParamError::NoWorkload);
        }
        Ok(params)
    }

    /// Fails on any parameter the workload does not know (a typo would
    /// otherwise silently run with a default).
    pub fn check_known(&self, known: &'static [&'static str]) -> Result<(), ParamError<'a>> {
        match self.pairs[..self.count]
            .iter()
            .find(|(key, _)| !known.contains(key))
        {
            Some((key, _)) => Err(ParamError::Unknown {
                workload: self.workload,
                key,
                known,
            }),
            None => Ok(()),
        }
    }

    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs[..self.count]
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }

    /// `probe.<key>` as a number in `min..=max`, or `default` when absent.
    pub fn u64(
        &self,
        key: &'static str,
        default: u64,
        min: u64,
        max: u64,
    ) -> Result<u64, ParamError<'a>> {
        let Some(value) = self.get(key) else {
            return Ok(default);
        };
        let number = value
            .parse::<u64>()
            .map_err(|_| ParamError::NotANumber { key, value })?;
        if !(min..=max).contains(&number) {
            return Err(ParamError::OutOfRange {
                key,
                value: number,
                min,
                max,
            });
        }
        Ok(number)
    }

    /// `probe.<key>` as a number, or `None` when absent.
    pub fn opt_u64(
        &self,
        key: &'static str,
        min: u64,
        max: u64,
    ) -> Result<Option<u64>, ParamError<'a>> {
        match self.get(key) {
            Some(_) => self.u64(key, 0, min, max).map(Some),
            None => Ok(None),
        }
    }

    /// `probe.<key>=0|1`.
    pub fn flag(&self, key: &'static str) -> Result<bool, ParamError<'a>> {
        Ok(self.u64(key, 0, 0, 1)? == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU_KEYS: &[&str] = &["max_prime", "events"];

    #[test]
    fn reads_the_workload_and_its_parameters() {
        let params =
            Params::parse("console=ttyS0 probe=cpu probe.events=5 quiet probe.max_prime=7")
                .unwrap();
        assert_eq!(params.workload, "cpu");
        assert_eq!(params.check_known(CPU_KEYS), Ok(()));
        assert_eq!(params.u64("events", 1, 1, 10), Ok(5));
        assert_eq!(params.u64("max_prime", 1, 1, 10), Ok(7));
        assert_eq!(params.opt_u64("other", 0, 9), Ok(None));
        assert_eq!(params.u64("other", 4, 0, 9), Ok(4));
    }

    #[test]
    fn the_last_repeat_wins() {
        let params = Params::parse("probe=hello probe=cpu probe.events=1 probe.events=2").unwrap();
        assert_eq!(params.workload, "cpu");
        assert_eq!(params.u64("events", 0, 0, 9), Ok(2));
    }

    #[test]
    fn bad_parameters_are_named() {
        assert_eq!(
            Params::parse("console=ttyS0").err(),
            Some(ParamError::NoWorkload)
        );
        assert_eq!(
            Params::parse("probe= x").err(),
            Some(ParamError::NoWorkload)
        );
        let params = Params::parse(
            "probe=cpu probe.evnets=5 probe.events=x probe.max_prime=99999999999999999999",
        )
        .unwrap();
        assert!(matches!(
            params.check_known(CPU_KEYS),
            Err(ParamError::Unknown { key: "evnets", .. })
        ));
        assert_eq!(
            params.u64("events", 1, 1, 10),
            Err(ParamError::NotANumber {
                key: "events",
                value: "x"
            })
        );
        assert!(matches!(
            params.u64("max_prime", 1, 1, 10),
            Err(ParamError::NotANumber { .. })
        ));
        let params = Params::parse("probe=mem probe.mib=0 probe.verify=2 probe.flag").unwrap();
        assert_eq!(
            params.u64("mib", 1, 1, 10),
            Err(ParamError::OutOfRange {
                key: "mib",
                value: 0,
                min: 1,
                max: 10
            })
        );
        assert!(params.flag("verify").is_err());
        assert_eq!(params.get("flag"), Some(""));
        let message = format!("{}", params.check_known(&["mib"]).unwrap_err());
        assert_eq!(
            message,
            "unknown parameter probe.verify for workload mem (known: mib)"
        );
    }

    #[test]
    fn too_many_parameters() {
        let cmdline = format!("probe=cpu{}", " probe.k=1".repeat(MAX_PARAMS + 1));
        assert_eq!(Params::parse(&cmdline).err(), Some(ParamError::TooMany));
    }
}
