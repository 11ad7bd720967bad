//! Storage pool definitions (libvirt's `<pool type='dir'>`): one
//! human-editable TOML file per pool, and the names and sizes the pool and
//! volume verbs take.
//!
//! ```toml
//! name = "default"
//! type = "dir"
//! target = "/var/lib/oxvirt/images"
//! ```

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::pool::PoolError;

/// The longest volume name (a file name on every Linux file system).
const MAX_VOLUME_NAME: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolDef {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: PoolType,
    /// The folder that holds the pool's volumes, one file each.
    pub target: PathBuf,
}

/// Where a pool's volumes live. Only folders so far (libvirt's `dir`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolType {
    #[default]
    Dir,
}

impl std::fmt::Display for PoolType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PoolType::Dir => "dir",
        })
    }
}

impl std::str::FromStr for PoolType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dir" => Ok(PoolType::Dir),
            _ => Err(format!(
                "{s:?}: unsupported pool type (only dir pools exist so far)"
            )),
        }
    }
}

impl PoolDef {
    /// Parses a definition; errors name `origin` and the line.
    pub fn parse(text: &str, origin: &str) -> Result<Self, PoolError> {
        toml::from_str(text).map_err(|e| PoolError::Parse {
            origin: origin.to_owned(),
            line: e
                .span()
                .map_or(1, |s| crate::config::line_of(text, s.start)),
            message: e.message().to_owned(),
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the definition: {e}\n"))
    }

    /// Checks the name and the target's spelling (not whether it exists:
    /// that is pool-build's and pool-start's business).
    pub fn validate(&self) -> Result<(), PoolError> {
        let invalid = |field, reason| PoolError::Invalid {
            pool: self.name.clone(),
            field,
            reason,
        };
        check_pool_name(&self.name).map_err(|r| invalid("name", r))?;
        check_target(&self.target).map_err(|r| invalid("target", r))
    }
}

/// Pool names: file names of their definitions, the `POOL/` of a disk's
/// `volume`.
pub fn check_pool_name(name: &str) -> Result<(), String> {
    crate::config::check_name(name)
}

/// A target goes into the VMM's `--disk path=...` flag: absolute, no `..`,
/// no `,` or `=`.
fn check_target(target: &Path) -> Result<(), String> {
    let text = target.to_string_lossy();
    if !target.is_absolute() {
        return Err(format!("{text}: must be an absolute path"));
    }
    if target.components().any(|c| c == Component::ParentDir) {
        return Err(format!("{text}: must not contain '..'"));
    }
    if text.contains([',', '=']) || text.chars().any(char::is_control) {
        return Err(format!(
            "{text}: must not contain ',', '=' or control characters"
        ));
    }
    Ok(())
}

/// Volume names are file names in the pool's folder. Names starting with
/// '.' are refused: the daemon builds new volumes under such names.
pub fn check_volume_name(name: &str) -> Result<(), String> {
    let problem = if name.is_empty() || name.len() > MAX_VOLUME_NAME {
        Some(format!("must be 1 to {MAX_VOLUME_NAME} bytes"))
    } else if name.contains('/') {
        Some("must not contain '/'".to_owned())
    } else if name.starts_with('.') {
        Some("must not start with '.'".to_owned())
    } else if name.contains([',', '=']) || name.chars().any(char::is_control) {
        Some("must not contain ',', '=' or control characters".to_owned())
    } else {
        None
    };
    match problem {
        Some(p) => Err(format!("volume name {name:?}: {p}")),
        None => Ok(()),
    }
}

/// A disk's `volume = "POOL/NAME"`, split and checked.
pub fn parse_volume_ref(text: &str) -> Result<(&str, &str), String> {
    let (pool, volume) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?}: expected POOL/VOLUME"))?;
    check_pool_name(pool)?;
    check_volume_name(volume)?;
    Ok((pool, volume))
}

/// virsh's scaled integers (`vol-create-as`'s capacity): a whole number
/// of bytes, or with a unit: `k`/`KiB` = 1024, `KB` = 1000, and the same
/// for M, G, T, P and E; case does not matter.
pub fn parse_capacity(text: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("{text:?}: {why}");
    let trimmed = text.trim();
    let digits = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits);
    if number.is_empty() {
        return Err(bad(
            "expected a whole number of bytes, optionally with a unit (K, KiB, KB, M, G, T, P, E)",
        ));
    }
    if unit.starts_with('.') {
        return Err(bad("a whole number is needed (1536M, not 1.5G)"));
    }
    let value: u64 = number.parse().map_err(|_| bad("too large"))?;
    let scale = unit_scale(unit).ok_or_else(|| {
        bad("unknown unit (expected b, K, KiB, KB, M, MiB, MB, G, GiB, GB, T, P or E)")
    })?;
    value.checked_mul(scale).ok_or_else(|| bad("too large"))
}

fn unit_scale(unit: &str) -> Option<u64> {
    let lower = unit.to_ascii_lowercase();
    if matches!(lower.as_str(), "" | "b" | "byte" | "bytes") {
        return Some(1);
    }
    let mut chars = lower.chars();
    let power = match chars.next()? {
        'k' => 1,
        'm' => 2,
        'g' => 3,
        't' => 4,
        'p' => 5,
        'e' => 6,
        _ => return None,
    };
    let base: u64 = match chars.as_str() {
        "" | "ib" => 1024,
        "b" => 1000,
        _ => return None,
    };
    Some(base.pow(power))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_parse_check_and_print() {
        let def = PoolDef::parse(
            "name = \"vms\"\ntype = \"dir\"\ntarget = \"/srv/vms\"\n",
            "p",
        )
        .unwrap();
        def.validate().unwrap();
        assert_eq!(def.kind, PoolType::Dir);
        assert_eq!(PoolDef::parse(&def.to_toml(), "again").unwrap(), def);
        let err = PoolDef::parse("name = \"vms\"\ntype = \"lvm\"\n", "p.toml").unwrap_err();
        assert!(err.to_string().starts_with("p.toml: line 2:"), "{err}");
        let err = PoolDef::parse("name = \"a\"\ntarget = \"/t\"\nsize = 3\n", "p").unwrap_err();
        assert!(err.to_string().contains("unknown field `size`"), "{err}");
        for (name, target, field) in [
            ("a/b", "/t", "name"),
            ("", "/t", "name"),
            ("ok", "relative", "target"),
            ("ok", "/srv/../etc", "target"),
            ("ok", "/srv/a,b", "target"),
        ] {
            let def = PoolDef {
                name: name.into(),
                kind: PoolType::Dir,
                target: target.into(),
            };
            let err = def.validate().unwrap_err();
            assert_eq!(err.field(), Some(field), "{name} {target}: {err}");
        }
    }

    #[test]
    fn capacities_are_virsh_scaled_integers() {
        for (text, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("10b", 10),
            ("1k", 1024),
            ("1KiB", 1024),
            ("1KB", 1000),
            ("2M", 2 << 20),
            ("1G", 1 << 30),
            ("1gib", 1 << 30),
            ("3GB", 3_000_000_000),
            ("1T", 1 << 40),
            ("2E", 2 << 60),
        ] {
            assert_eq!(parse_capacity(text), Ok(bytes), "{text}");
        }
        for bad in [
            "",
            "G",
            "1.5G",
            "-1G",
            "10X",
            "1GiBs",
            "16E",
            "99999999999999999999",
        ] {
            let err = parse_capacity(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn volume_names_and_references() {
        for ok in ["a.qcow2", "web-1_root.img", "x"] {
            check_volume_name(ok).unwrap();
        }
        for bad in ["", "a/b", ".hidden", "..", "a,b", "a=b", "a\nb"] {
            assert!(check_volume_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_volume_name(&"x".repeat(256)).is_err());
        assert_eq!(
            parse_volume_ref("default/web.qcow2"),
            Ok(("default", "web.qcow2"))
        );
        for bad in ["web.qcow2", "default/", "/web", "default/a/b", "bad pool/x"] {
            assert!(parse_volume_ref(bad).is_err(), "{bad}");
        }
    }
}
