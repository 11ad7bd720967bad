//! IPv4 networks in CIDR notation.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use super::NetError;

/// An address with a prefix length, such as `192.168.122.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Cidr {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self, NetError> {
        if prefix > 32 {
            return Err(NetError::BadAddress {
                input: format!("{addr}/{prefix}"),
                reason: "the prefix length must be from 0 to 32",
            });
        }
        Ok(Ipv4Cidr { addr, prefix })
    }

    /// The network this address is in (`192.168.122.0/24`).
    pub fn network(&self) -> Ipv4Cidr {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(self.addr) & mask),
            prefix: self.prefix,
        }
    }
}

impl FromStr for Ipv4Cidr {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| NetError::BadAddress {
            input: s.to_owned(),
            reason,
        };
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| bad("expected ADDRESS/PREFIX"))?;
        let addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix = prefix
            .parse()
            .map_err(|_| bad("the prefix length is not a number"))?;
        Ipv4Cidr::new(addr, prefix).map_err(|_| bad("the prefix length must be from 0 to 32"))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_masks() {
        let c: Ipv4Cidr = "192.168.122.1/24".parse().unwrap();
        assert_eq!(c.network().to_string(), "192.168.122.0/24");
        assert_eq!(
            "10.1.2.3/0"
                .parse::<Ipv4Cidr>()
                .unwrap()
                .network()
                .to_string(),
            "0.0.0.0/0"
        );
        assert_eq!(
            "10.1.2.3/32"
                .parse::<Ipv4Cidr>()
                .unwrap()
                .network()
                .to_string(),
            "10.1.2.3/32"
        );
        for bad in ["10.0.0.1", "10.0.0.1/33", "10.0.0/8", "x/8", "10.0.0.1/-1"] {
            let err = bad.parse::<Ipv4Cidr>().unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
