//! `probe.ip=A.B.C.D/NN`: the `net` workload's IPv4 address and prefix.

/// An IPv4 address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ipv4Cidr {
    pub addr: [u8; 4],
    pub prefix: u8,
}

/// Parses `A.B.C.D/NN` (decimal octets, prefix 1..=32).
pub fn parse_cidr(text: &str) -> Result<Ipv4Cidr, &'static str> {
    let (addr, prefix) = text.split_once('/').ok_or("expected A.B.C.D/NN")?;
    let prefix: u8 = prefix.parse().map_err(|_| "the prefix is not a number")?;
    if !(1..=32).contains(&prefix) {
        return Err("the prefix is not in 1..=32");
    }
    let mut octets = [0u8; 4];
    let mut parts = addr.split('.');
    for octet in &mut octets {
        let part = parts.next().ok_or("the address has fewer than 4 octets")?;
        *octet = part
            .parse()
            .map_err(|_| "an octet is not a number in 0..=255")?;
    }
    if parts.next().is_some() {
        return Err("the address has more than 4 octets");
    }
    Ok(Ipv4Cidr {
        addr: octets,
        prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_bad_input() {
        assert_eq!(
            parse_cidr("10.0.2.15/24"),
            Ok(Ipv4Cidr {
                addr: [10, 0, 2, 15],
                prefix: 24
            })
        );
        for (bad, why) in [
            ("10.0.2.15", "expected"),
            ("10.0.2.15/33", "1..=32"),
            ("10.0.2.15/x", "prefix"),
            ("10.0.2/24", "fewer"),
            ("10.0.2.1.5/24", "more"),
            ("10.0.256.1/24", "octet"),
            ("/", "prefix"),
        ] {
            let err = parse_cidr(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
