//! qemu-img's getopt-style arguments: `-f fmt`, `-ffmt`, `-pc`,
//! `--output=json`, `--output json`, and `-o a=b,c=d` option lists.

use anyhow::{bail, Context, Result};

pub struct Opts {
    pub flags: Vec<(String, Option<String>)>,
    pub positional: Vec<String>,
}

impl Opts {
    /// Parses `args`; `valued` lists the options that take a value
    /// (short as "f", long as "output").
    pub fn parse(args: &[String], valued: &[&str], known: &[&str]) -> Result<Opts> {
        let mut flags = Vec::new();
        let mut positional = Vec::new();
        let mut it = args.iter().peekable();
        while let Some(arg) = it.next() {
            if arg == "--" {
                positional.extend(it.by_ref().cloned());
                break;
            }
            if let Some(long) = arg.strip_prefix("--") {
                let (name, inline) = match long.split_once('=') {
                    Some((n, v)) => (n, Some(v.to_string())),
                    None => (long, None),
                };
                if !valued.contains(&name) && !known.contains(&name) {
                    bail!("unrecognized option '--{name}'");
                }
                let value = match (inline, valued.contains(&name)) {
                    (Some(v), _) => Some(v),
                    (None, true) => Some(
                        it.next()
                            .with_context(|| format!("option '--{name}' requires an argument"))?
                            .clone(),
                    ),
                    (None, false) => None,
                };
                flags.push((name.to_string(), value));
                continue;
            }
            // A negative size ("-1G") is a positional argument, as in qemu-img resize.
            let negative_number = arg.len() > 1 && arg.as_bytes()[1].is_ascii_digit();
            if arg.len() > 1 && arg.starts_with('-') && !negative_number {
                let chars: Vec<char> = arg[1..].chars().collect();
                let mut i = 0;
                while i < chars.len() {
                    let name = chars[i].to_string();
                    if valued.contains(&name.as_str()) {
                        let rest: String = chars[i + 1..].iter().collect();
                        let value = if rest.is_empty() {
                            it.next()
                                .with_context(|| {
                                    format!("option requires an argument -- '{name}'")
                                })?
                                .clone()
                        } else {
                            rest
                        };
                        flags.push((name, Some(value)));
                        break;
                    }
                    if !known.contains(&name.as_str()) {
                        bail!("invalid option -- '{name}'");
                    }
                    flags.push((name, None));
                    i += 1;
                }
                continue;
            }
            positional.push(arg.clone());
        }
        Ok(Opts { flags, positional })
    }

    pub fn has(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, _)| n == name)
    }

    /// The last value given for an option.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Every `-o` list, split into key=value pairs.
    pub fn options(&self) -> Vec<(String, String)> {
        self.flags
            .iter()
            .filter(|(n, _)| n == "o")
            .filter_map(|(_, v)| v.as_deref())
            .flat_map(|v| v.split(','))
            .filter(|kv| !kv.is_empty())
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv.to_string(), "on".to_string()),
            })
            .collect()
    }
}

/// A size with qemu-img's suffixes (k, M, G, T, P, E; b for bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => bail!("Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes: '{s}'"),
    };
    let value: f64 = num
        .parse()
        .with_context(|| format!("Invalid image size specified: '{s}'"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !(0.0..9.2e18).contains(&bytes) {
        bail!("Image size must be less than 8 EiB: '{s}'");
    }
    Ok(bytes as u64)
}

pub fn on_off(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("Parameter '{key}' expects 'on' or 'off'"),
    }
}
