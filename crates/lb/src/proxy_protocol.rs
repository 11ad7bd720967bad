//! PROXY protocol v1 (text) and v2 (binary): parsing on accept, encoding for upstreams.
//! Spec: <https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt>.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_MAX: usize = 107;
/// Upper bound on a v2 header with TLVs; anything longer is refused.
pub const V2_MAX: usize = 16 + 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PpError {
    #[error("no PROXY protocol header (connection starts with {0:?})")]
    Missing(String),
    #[error("malformed PROXY v1 header: {0}")]
    BadV1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    BadV2(&'static str),
    #[error("PROXY header longer than {0} bytes")]
    TooLong(usize),
    #[error("connection closed before the PROXY header was complete")]
    Eof,
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY header: {0}")]
    Io(String),
    #[error("PROXY v1 cannot describe UDP: a datagram needs a v2 header")]
    V1Datagram,
    #[error("datagram ends inside its PROXY header")]
    Truncated,
}

/// What a PROXY header said about the original connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// `None` for `UNKNOWN` (v1) or `LOCAL`/unspecified (v2): use the real peer.
    pub source: Option<SocketAddr>,
    pub dest: Option<SocketAddr>,
}

enum Parse {
    Incomplete,
    Done(Header, usize),
}

/// Reads a PROXY header (either version) with a deadline; returns it with any
/// payload bytes that arrived in the same reads.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<(Header, Vec<u8>), PpError> {
    tokio::time::timeout(timeout, read_header_inner(r))
        .await
        .map_err(|_| PpError::Timeout(timeout))?
}

async fn read_header_inner<R: AsyncRead + Unpin>(r: &mut R) -> Result<(Header, Vec<u8>), PpError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = r
            .read(&mut chunk)
            .await
            .map_err(|e| PpError::Io(e.to_string()))?;
        if n == 0 {
            return Err(PpError::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Parse::Done(header, len) = parse(&buf)? {
            return Ok((header, buf.split_off(len)));
        }
    }
}

/// Parses the PROXY header that starts a datagram (`listen ... udp
/// proxy_protocol`; every datagram carries one). Returns it and its length.
pub fn parse_datagram(datagram: &[u8]) -> Result<(Header, usize), PpError> {
    if datagram.starts_with(b"PROXY ") {
        return Err(PpError::V1Datagram);
    }
    match parse(datagram)? {
        Parse::Done(header, len) => Ok((header, len)),
        Parse::Incomplete => Err(PpError::Truncated),
    }
}

fn parse(buf: &[u8]) -> Result<Parse, PpError> {
    let probe = &buf[..buf.len().min(V2_SIG.len())];
    if V2_SIG.starts_with(probe) {
        return parse_v2(buf);
    }
    if b"PROXY ".starts_with(&buf[..buf.len().min(6)]) {
        return parse_v1(buf);
    }
    let shown = String::from_utf8_lossy(&buf[..buf.len().min(16)]).into_owned();
    Err(PpError::Missing(shown))
}

fn parse_v1(buf: &[u8]) -> Result<Parse, PpError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() >= V1_MAX {
            return Err(PpError::TooLong(V1_MAX));
        }
        return Ok(Parse::Incomplete);
    };
    if end + 2 > V1_MAX {
        return Err(PpError::TooLong(V1_MAX));
    }
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| PpError::BadV1("not ASCII"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    let header = match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Header {
            source: None,
            dest: None,
        },
        ["PROXY", proto, src, dst, sport, dport] => {
            let (src, dst): (IpAddr, IpAddr) = (
                src.parse()
                    .map_err(|_| PpError::BadV1("bad source address"))?,
                dst.parse()
                    .map_err(|_| PpError::BadV1("bad destination address"))?,
            );
            let family_ok = match *proto {
                "TCP4" => src.is_ipv4() && dst.is_ipv4(),
                "TCP6" => src.is_ipv6() && dst.is_ipv6(),
                _ => return Err(PpError::BadV1("protocol is not TCP4, TCP6 or UNKNOWN")),
            };
            if !family_ok {
                return Err(PpError::BadV1("address family does not match the protocol"));
            }
            Header {
                source: Some(SocketAddr::new(src, v1_port(sport)?)),
                dest: Some(SocketAddr::new(dst, v1_port(dport)?)),
            }
        }
        _ => return Err(PpError::BadV1("wrong number of fields")),
    };
    Ok(Parse::Done(header, end + 2))
}

fn v1_port(s: &str) -> Result<u16, PpError> {
    if s.is_empty() || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(PpError::BadV1("bad port"));
    }
    s.parse().map_err(|_| PpError::BadV1("bad port"))
}

fn parse_v2(buf: &[u8]) -> Result<Parse, PpError> {
    if buf.len() < 16 {
        return Ok(Parse::Incomplete);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(PpError::BadV2("version is not 2"));
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if 16 + len > V2_MAX {
        return Err(PpError::TooLong(V2_MAX));
    }
    if buf.len() < 16 + len {
        return Ok(Parse::Incomplete);
    }
    let body = &buf[16..16 + len];
    let header = match ver_cmd & 0x0f {
        0 => Header {
            source: None,
            dest: None,
        },
        1 => v2_addresses(buf[13], body)?,
        _ => return Err(PpError::BadV2("command is neither LOCAL nor PROXY")),
    };
    Ok(Parse::Done(header, 16 + len))
}

fn v2_addresses(family: u8, body: &[u8]) -> Result<Header, PpError> {
    let (src, dst, ports) = match family >> 4 {
        0 => {
            return Ok(Header {
                source: None,
                dest: None,
            })
        }
        1 => {
            let b = body
                .get(..12)
                .ok_or(PpError::BadV2("IPv4 address block too short"))?;
            let src = IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            let dst = IpAddr::V4(Ipv4Addr::new(b[4], b[5], b[6], b[7]));
            (src, dst, &b[8..12])
        }
        2 => {
            let b = body
                .get(..36)
                .ok_or(PpError::BadV2("IPv6 address block too short"))?;
            let octets = |s: &[u8]| -> [u8; 16] {
                let mut a = [0u8; 16];
                a.copy_from_slice(s);
                a
            };
            let src = IpAddr::V6(Ipv6Addr::from(octets(&b[..16])));
            let dst = IpAddr::V6(Ipv6Addr::from(octets(&b[16..32])));
            (src, dst, &b[32..36])
        }
        3 => {
            return Ok(Header {
                source: None,
                dest: None,
            })
        }
        _ => return Err(PpError::BadV2("unknown address family")),
    };
    if !matches!(family & 0x0f, 1 | 2) {
        return Err(PpError::BadV2("transport is neither STREAM nor DGRAM"));
    }
    Ok(Header {
        source: Some(SocketAddr::new(
            src,
            u16::from_be_bytes([ports[0], ports[1]]),
        )),
        dest: Some(SocketAddr::new(
            dst,
            u16::from_be_bytes([ports[2], ports[3]]),
        )),
    })
}

/// Maps IPv4-mapped IPv6 addresses back to IPv4 so families can match.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    }
}

/// The v1 line nginx's `proxy_protocol on` sends.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let (src, dst) = (canonical(src), canonical(dst));
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            format!("PROXY TCP4 {s} {d} {} {}\r\n", src.port(), dst.port())
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            format!("PROXY TCP6 {s} {d} {} {}\r\n", src.port(), dst.port())
        }
        _ => "PROXY UNKNOWN\r\n".to_string(),
    }
    .into_bytes()
}

/// A v2 PROXY header (no TLVs), for TCP (`STREAM`) or UDP (`DGRAM`).
pub fn encode_v2(src: SocketAddr, dst: SocketAddr, udp: bool) -> Vec<u8> {
    let (src, dst) = (canonical(src), canonical(dst));
    let transport = if udp { 2 } else { 1 };
    let mut out = V2_SIG.to_vec();
    out.push(0x21);
    let mut body = Vec::with_capacity(36);
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            body.extend_from_slice(&s.octets());
            body.extend_from_slice(&d.octets());
            0x10
        }
        (s, d) => {
            body.extend_from_slice(&to_v6(s).octets());
            body.extend_from_slice(&to_v6(d).octets());
            0x20
        }
    };
    body.extend_from_slice(&src.port().to_be_bytes());
    body.extend_from_slice(&dst.port().to_be_bytes());
    out.push(family | transport);
    // At most 36 bytes, so the length always fits.
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(buf: &[u8]) -> (Header, usize) {
        match parse(buf).unwrap() {
            Parse::Done(h, n) => (h, n),
            Parse::Incomplete => panic!("incomplete"),
        }
    }

    #[test]
    fn v1_round_trip_and_unknown() {
        let src: SocketAddr = "192.0.2.1:5555".parse().unwrap();
        let dst: SocketAddr = "198.51.100.2:80".parse().unwrap();
        let mut wire = encode_v1(src, dst);
        assert_eq!(wire, b"PROXY TCP4 192.0.2.1 198.51.100.2 5555 80\r\n");
        wire.extend_from_slice(b"GET /");
        let (h, n) = done(&wire);
        assert_eq!(
            (h.source, h.dest, n),
            (Some(src), Some(dst), wire.len() - 5)
        );
        let v6 = encode_v1(
            "[2001:db8::1]:1".parse().unwrap(),
            "[::1]:2".parse().unwrap(),
        );
        assert_eq!(done(&v6).0.source, Some("[2001:db8::1]:1".parse().unwrap()));
        assert_eq!(done(b"PROXY UNKNOWN\r\n").0.source, None);
    }

    #[test]
    fn v2_round_trip_v4_v6_udp() {
        for (s, d) in [
            ("10.1.2.3:4000", "10.0.0.1:443"),
            ("[2001:db8::7]:9", "[2001:db8::8]:10"),
        ] {
            let (src, dst) = (s.parse().unwrap(), d.parse().unwrap());
            for udp in [false, true] {
                let wire = encode_v2(src, dst, udp);
                let (h, n) = done(&wire);
                assert_eq!((h.source, h.dest, n), (Some(src), Some(dst), wire.len()));
            }
        }
    }

    #[test]
    fn v2_local_and_tlvs() {
        let mut local = V2_SIG.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(done(&local).0.source, None);
        let mut with_tlv = encode_v2(
            "1.2.3.4:5".parse().unwrap(),
            "6.7.8.9:10".parse().unwrap(),
            false,
        );
        with_tlv[15] += 7;
        with_tlv.extend_from_slice(&[0x05, 0, 4, b'a', b'b', b'c', b'd']);
        let (h, n) = done(&with_tlv);
        assert_eq!((h.source.unwrap().port(), n), (5, with_tlv.len()));
    }

    #[test]
    fn incomplete_headers_wait_for_more() {
        let wire = encode_v2(
            "1.2.3.4:5".parse().unwrap(),
            "6.7.8.9:10".parse().unwrap(),
            false,
        );
        for cut in [1, 5, 12, 15, 20] {
            assert!(
                matches!(parse(&wire[..cut]), Ok(Parse::Incomplete)),
                "cut {cut}"
            );
        }
        assert!(matches!(parse(b"PROXY TCP4 1.2"), Ok(Parse::Incomplete)));
        assert!(matches!(parse(b"PRO"), Ok(Parse::Incomplete)));
    }

    #[test]
    fn hostile_headers_are_rejected() {
        let bad: &[(&[u8], &str)] = &[
            (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
                "wrong number of fields",
            ),
            (
                b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n",
                "bad source address",
            ),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n", "family does not match"),
            (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "protocol is not"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "bad port"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "bad port"),
            (b"\r\n\r\n\0\r\nQUIT\n\x11\x11\0\0", "version is not 2"),
            (b"\r\n\r\n\0\r\nQUIT\n\x2f\x11\0\0", "command is neither"),
            (
                b"\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x04abcd",
                "IPv4 address block too short",
            ),
            (
                b"\r\n\r\n\0\r\nQUIT\n\x21\x91\0\0",
                "unknown address family",
            ),
            (b"\r\n\r\n\0\r\nQUIT\n\x21\xff\xff\xff", "longer than"),
        ];
        for (wire, want) in bad {
            let e = match parse(wire) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{wire:?} accepted"),
            };
            assert!(e.contains(want), "{wire:?}: {e}");
        }
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(parse(&long).err(), Some(PpError::TooLong(V1_MAX)));
    }

    #[test]
    fn datagrams_need_a_whole_v2_header() {
        let (src, dst) = (
            "10.0.0.1:53".parse().unwrap(),
            "10.0.0.2:53".parse().unwrap(),
        );
        let mut d = encode_v2(src, dst, true);
        let len = d.len();
        d.extend_from_slice(b"query");
        assert_eq!(
            parse_datagram(&d),
            Ok((
                Header {
                    source: Some(src),
                    dest: Some(dst)
                },
                len
            ))
        );
        assert_eq!(parse_datagram(&d[..len - 1]), Err(PpError::Truncated));
        assert_eq!(
            parse_datagram(&encode_v1(src, dst)),
            Err(PpError::V1Datagram)
        );
        assert!(matches!(parse_datagram(b"query"), Err(PpError::Missing(_))));
        assert_eq!(parse_datagram(b""), Err(PpError::Truncated));
    }

    #[tokio::test]
    async fn read_header_keeps_payload_and_times_out() {
        let mut wire = encode_v1("1.2.3.4:5".parse().unwrap(), "6.7.8.9:10".parse().unwrap());
        wire.extend_from_slice(b"hello");
        let (h, rest) = read_header(&mut wire.as_slice(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            (h.source.unwrap().port(), rest.as_slice()),
            (5, b"hello".as_slice())
        );
        let (_client, mut server) = tokio::io::duplex(64);
        let e = read_header(&mut server, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(e, PpError::Timeout(Duration::from_millis(50)));
        assert_eq!(
            read_header(&mut b"PROXY ".as_slice(), Duration::from_secs(1))
                .await
                .unwrap_err(),
            PpError::Eof
        );
    }
}
