//! The DHCPv4 message format (RFC 2131 section 2, options RFC 2132): the
//! fixed BOOTP header, the magic cookie and the options that follow it.

use std::net::Ipv4Addr;

use super::DhcpError;

/// BOOTP `op` values.
pub const BOOTREQUEST: u8 = 1;
pub const BOOTREPLY: u8 = 2;

/// The fixed header is 236 bytes, then the 4-byte magic cookie.
const HEADER_LEN: usize = 236;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Replies are padded to BOOTP's minimum size: some clients drop shorter ones.
const MIN_REPLY_LEN: usize = 300;
/// The broadcast bit of `flags` (RFC 2131 figure 2).
pub const FLAG_BROADCAST: u16 = 0x8000;

/// Option codes this server reads or writes (RFC 2132).
pub mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOST_NAME: u8 = 12;
    pub const BROADCAST: u8 = 28;
    pub const REQUESTED_IP: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const CLIENT_ID: u8 = 61;
    pub const END: u8 = 255;
}

/// DHCP message types (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
    Inform = 8,
}

impl MessageType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            _ => return None,
        })
    }
}

/// A decoded message. Only Ethernet clients (htype 1, hlen 6) are accepted,
/// which is what a VM's virtio-net is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub op: u8,
    pub xid: u32,
    pub secs: u16,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 6],
    pub message_type: MessageType,
    /// Options other than the message type, in order, without pad/end.
    pub options: Vec<(u8, Vec<u8>)>,
}

impl Packet {
    /// Decodes a message; anything that is not a well-formed DHCP message
    /// is an error saying what is wrong (and never a panic).
    pub fn decode(bytes: &[u8]) -> Result<Self, DhcpError> {
        let bad = |reason: String| DhcpError::Malformed { reason };
        if bytes.len() < HEADER_LEN + MAGIC_COOKIE.len() {
            return Err(bad(format!(
                "{} bytes, shorter than the {} of a DHCP header",
                bytes.len(),
                HEADER_LEN + MAGIC_COOKIE.len()
            )));
        }
        let (htype, hlen) = (bytes[1], bytes[2]);
        if htype != 1 || hlen != 6 {
            return Err(bad(format!(
                "hardware type {htype} length {hlen}: only Ethernet (1, 6) is served"
            )));
        }
        if bytes[HEADER_LEN..HEADER_LEN + 4] != MAGIC_COOKIE {
            return Err(bad("no DHCP magic cookie (a plain BOOTP message?)".into()));
        }
        let options = decode_options(&bytes[HEADER_LEN + 4..])?;
        let mut message_type = None;
        let mut rest = Vec::with_capacity(options.len());
        for (code, value) in options {
            if code == opt::MESSAGE_TYPE {
                let [t] = value[..] else {
                    return Err(bad(format!("message type option of {} bytes", value.len())));
                };
                message_type =
                    Some(MessageType::from_u8(t).ok_or_else(|| bad(format!("message type {t}")))?);
            } else {
                rest.push((code, value));
            }
        }
        let message_type = message_type.ok_or_else(|| bad("no message type option".into()))?;
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&bytes[28..34]);
        Ok(Packet {
            op: bytes[0],
            xid: be32(&bytes[4..8]),
            secs: u16::from_be_bytes([bytes[8], bytes[9]]),
            flags: u16::from_be_bytes([bytes[10], bytes[11]]),
            ciaddr: ip_at(bytes, 12),
            yiaddr: ip_at(bytes, 16),
            siaddr: ip_at(bytes, 20),
            giaddr: ip_at(bytes, 24),
            chaddr,
            message_type,
            options: rest,
        })
    }

    /// Encodes the message, padded to 300 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_LEN];
        out[0] = self.op;
        out[1] = 1;
        out[2] = 6;
        out[4..8].copy_from_slice(&self.xid.to_be_bytes());
        out[8..10].copy_from_slice(&self.secs.to_be_bytes());
        out[10..12].copy_from_slice(&self.flags.to_be_bytes());
        for (at, ip) in [
            (12, self.ciaddr),
            (16, self.yiaddr),
            (20, self.siaddr),
            (24, self.giaddr),
        ] {
            out[at..at + 4].copy_from_slice(&ip.octets());
        }
        out[28..34].copy_from_slice(&self.chaddr);
        out.extend_from_slice(&MAGIC_COOKIE);
        out.extend_from_slice(&[opt::MESSAGE_TYPE, 1, self.message_type as u8]);
        for (code, value) in &self.options {
            // Longer values are split into several instances (RFC 3396).
            for chunk in value.chunks(255) {
                out.push(*code);
                out.push(chunk.len() as u8);
                out.extend_from_slice(chunk);
            }
        }
        out.push(opt::END);
        if out.len() < MIN_REPLY_LEN {
            out.resize(MIN_REPLY_LEN, 0);
        }
        out
    }

    /// The value of option `code` (instances of a split option joined).
    pub fn option(&self, code: u8) -> Option<Vec<u8>> {
        let mut found: Option<Vec<u8>> = None;
        for (c, value) in &self.options {
            if *c == code {
                found.get_or_insert_with(Vec::new).extend_from_slice(value);
            }
        }
        found
    }

    /// An option holding one IPv4 address (requested IP, server id).
    pub fn ip_option(&self, code: u8) -> Option<Ipv4Addr> {
        let value = self.option(code)?;
        let octets: [u8; 4] = value.as_slice().try_into().ok()?;
        Some(Ipv4Addr::from(octets))
    }

    /// The client's host name option, if it is printable text.
    pub fn host_name(&self) -> Option<String> {
        let value = self.option(opt::HOST_NAME)?;
        let name = String::from_utf8(value).ok()?;
        let printable = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        printable.then_some(name)
    }
}

fn decode_options(mut rest: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, DhcpError> {
    let mut options = Vec::new();
    loop {
        match rest {
            [] => {
                return Err(DhcpError::Malformed {
                    reason: "options do not end with the end option (255)".into(),
                })
            }
            [opt::END, ..] => return Ok(options),
            [opt::PAD, tail @ ..] => rest = tail,
            [code, len, tail @ ..] if tail.len() >= usize::from(*len) => {
                let (value, tail) = tail.split_at(usize::from(*len));
                options.push((*code, value.to_vec()));
                rest = tail;
            }
            [code, ..] => {
                return Err(DhcpError::Malformed {
                    reason: format!("option {code} runs past the end of the message"),
                })
            }
        }
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn ip_at(bytes: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3])
}

/// `52:54:00:12:34:56`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    let hex: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}

/// Parses `52:54:00:12:34:56` (either case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discover() -> Packet {
        Packet {
            op: BOOTREQUEST,
            xid: 0x1234_5678,
            secs: 3,
            flags: FLAG_BROADCAST,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr: [0x52, 0x54, 0, 1, 2, 3],
            message_type: MessageType::Discover,
            options: vec![
                (opt::REQUESTED_IP, vec![10, 0, 0, 7]),
                (opt::HOST_NAME, b"web-1".to_vec()),
            ],
        }
    }

    #[test]
    fn round_trips_and_pads_to_bootp_size() {
        let p = discover();
        let bytes = p.encode();
        assert_eq!(bytes.len(), MIN_REPLY_LEN);
        assert_eq!(&bytes[236..240], &MAGIC_COOKIE);
        assert_eq!(Packet::decode(&bytes).unwrap(), p);
        assert_eq!(
            p.ip_option(opt::REQUESTED_IP),
            Some(Ipv4Addr::new(10, 0, 0, 7))
        );
        assert_eq!(p.host_name().as_deref(), Some("web-1"));
    }

    #[test]
    fn reads_a_message_from_a_real_client() {
        // The header and options of a udhcpc DISCOVER (busybox 1.35).
        let mut bytes = vec![0u8; 236];
        bytes[..4].copy_from_slice(&[1, 1, 6, 0]);
        bytes[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        bytes[28..34].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        bytes.extend_from_slice(&MAGIC_COOKIE);
        bytes.extend_from_slice(&[53, 1, 1, 61, 7, 1, 2, 0, 0, 0, 0, 1]);
        bytes.extend_from_slice(&[57, 2, 2, 64, 55, 7, 1, 3, 6, 12, 15, 28, 42, 0, 0, 255]);
        let p = Packet::decode(&bytes).unwrap();
        assert_eq!(p.message_type, MessageType::Discover);
        assert_eq!(p.xid, 0xdead_beef);
        assert_eq!(p.chaddr, [2, 0, 0, 0, 0, 1]);
        assert_eq!(p.option(55).unwrap(), vec![1, 3, 6, 12, 15, 28, 42]);
        assert_eq!(p.option(opt::CLIENT_ID).unwrap().len(), 7);
    }

    #[test]
    fn split_options_are_joined_and_long_values_split() {
        let mut p = discover();
        p.options = vec![(opt::HOST_NAME, vec![b'a'; 300])];
        let decoded = Packet::decode(&p.encode()).unwrap();
        assert_eq!(decoded.options.len(), 2);
        assert_eq!(decoded.option(opt::HOST_NAME).unwrap().len(), 300);
    }

    #[test]
    fn hostile_messages_are_errors_not_panics() {
        let good = discover().encode();
        for len in 0..good.len() {
            // Every truncation fails cleanly (the padding ends at 255 early).
            let _ = Packet::decode(&good[..len]);
        }
        let mut state = 0x9e37_79b9_u32;
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..8 {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let at = state as usize % bytes.len();
                bytes[at] = (state >> 24) as u8;
            }
            let _ = Packet::decode(&bytes);
        }
        type Spoil = dyn Fn(&mut Vec<u8>);
        let cases: [(&Spoil, &str); 6] = [
            (&|b| b.truncate(100), "shorter than"),
            (&|b| b[2] = 16, "only Ethernet"),
            (&|b| b[236] = 0, "magic cookie"),
            (&|b| b.truncate(243), "end option"),
            (&|b| b[242] = 9, "message type 9"),
            (&|b| b[241] = 200, "past the end"),
        ];
        for (spoil, expected) in cases {
            let mut bytes = good.clone();
            spoil(&mut bytes);
            let err = Packet::decode(&bytes).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} lacks {expected}");
        }
        let mut no_type = good[..240].to_vec();
        no_type.push(opt::END);
        let err = Packet::decode(&no_type).unwrap_err().to_string();
        assert!(err.contains("no message type"), "{err}");
    }

    #[test]
    fn macs_parse_and_print() {
        let mac = parse_mac("52:54:00:AB:cd:0f").unwrap();
        assert_eq!(format_mac(&mac), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "5:254:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }
}
