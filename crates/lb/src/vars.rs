//! `$variable` templates used by `log_format`, `hash` and `limit_conn_zone`.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

/// A variable nginx stream defines and we can fill in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    RemoteAddr,
    RemotePort,
    BinaryRemoteAddr,
    ProxyProtocolAddr,
    ProxyProtocolPort,
    RealipRemoteAddr,
    ServerAddr,
    ServerPort,
    UpstreamAddr,
    BytesSent,
    BytesReceived,
    UpstreamBytesSent,
    UpstreamBytesReceived,
    UpstreamConnectTime,
    SessionTime,
    Status,
    TimeLocal,
    TimeIso8601,
    Msec,
    Protocol,
    Connection,
    Pid,
}

impl Var {
    fn from_name(name: &str) -> Option<Var> {
        Some(match name {
            "remote_addr" => Var::RemoteAddr,
            "remote_port" => Var::RemotePort,
            "binary_remote_addr" => Var::BinaryRemoteAddr,
            "proxy_protocol_addr" => Var::ProxyProtocolAddr,
            "proxy_protocol_port" => Var::ProxyProtocolPort,
            "realip_remote_addr" => Var::RealipRemoteAddr,
            "server_addr" => Var::ServerAddr,
            "server_port" => Var::ServerPort,
            "upstream_addr" => Var::UpstreamAddr,
            "bytes_sent" => Var::BytesSent,
            "bytes_received" => Var::BytesReceived,
            "upstream_bytes_sent" => Var::UpstreamBytesSent,
            "upstream_bytes_received" => Var::UpstreamBytesReceived,
            "upstream_connect_time" => Var::UpstreamConnectTime,
            "session_time" => Var::SessionTime,
            "status" => Var::Status,
            "time_local" => Var::TimeLocal,
            "time_iso8601" => Var::TimeIso8601,
            "msec" => Var::Msec,
            "protocol" => Var::Protocol,
            "connection" => Var::Connection,
            "pid" => Var::Pid,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Var(Var),
}

/// A string with `$name` / `${name}` references, checked when parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VarError {
    #[error("unknown variable \"${0}\"")]
    Unknown(String),
    #[error("unterminated \"${{\" in \"{0}\"")]
    Unterminated(String),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, VarError> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(i) = rest.find('$') {
            lit.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let (name, tail) = if let Some(braced) = after.strip_prefix('{') {
                let end = braced
                    .find('}')
                    .ok_or_else(|| VarError::Unterminated(text.to_string()))?;
                (&braced[..end], &braced[end + 1..])
            } else {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], &after[end..])
            };
            if name.is_empty() {
                lit.push('$');
            } else {
                let var =
                    Var::from_name(name).ok_or_else(|| VarError::Unknown(name.to_string()))?;
                if !lit.is_empty() {
                    parts.push(Part::Lit(std::mem::take(&mut lit)));
                }
                parts.push(Part::Var(var));
            }
            rest = tail;
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template { parts })
    }

    pub fn uses(&self, var: Var) -> bool {
        self.parts.contains(&Part::Var(var))
    }

    pub fn render(&self, vars: &Vars) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Var(v) => vars.write(*v, &mut out),
            }
        }
        out
    }
}

/// What a session knows about itself, for rendering templates.
#[derive(Debug, Clone)]
pub struct Vars {
    pub client: SocketAddr,
    /// The address from the PROXY header, if one was accepted.
    pub proxy_protocol: Option<SocketAddr>,
    /// The client address after `set_real_ip_from`.
    pub remote: SocketAddr,
    pub server: SocketAddr,
    pub udp: bool,
    pub upstream_addr: Vec<SocketAddr>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub upstream_bytes_sent: u64,
    pub upstream_bytes_received: u64,
    pub upstream_connect_time: Option<Duration>,
    pub started: SystemTime,
    pub status: u16,
    pub connection: u64,
}

impl Vars {
    pub fn new(client: SocketAddr, server: SocketAddr, udp: bool, connection: u64) -> Vars {
        Vars {
            client,
            proxy_protocol: None,
            remote: client,
            server,
            udp,
            upstream_addr: Vec::new(),
            bytes_sent: 0,
            bytes_received: 0,
            upstream_bytes_sent: 0,
            upstream_bytes_received: 0,
            upstream_connect_time: None,
            started: SystemTime::now(),
            status: 200,
            connection,
        }
    }

    fn write(&self, var: Var, out: &mut String) {
        let now = SystemTime::now();
        // Writing to a String cannot fail.
        let _ = match var {
            Var::RemoteAddr => write!(out, "{}", self.remote.ip()),
            Var::RemotePort => write!(out, "{}", self.remote.port()),
            Var::BinaryRemoteAddr => {
                match self.remote.ip() {
                    IpAddr::V4(ip) => ip.octets().iter().for_each(|b| out.push(char::from(*b))),
                    IpAddr::V6(ip) => ip.octets().iter().for_each(|b| out.push(char::from(*b))),
                }
                Ok(())
            }
            Var::ProxyProtocolAddr => match self.proxy_protocol {
                Some(a) => write!(out, "{}", a.ip()),
                None => Ok(()),
            },
            Var::ProxyProtocolPort => match self.proxy_protocol {
                Some(a) => write!(out, "{}", a.port()),
                None => Ok(()),
            },
            Var::RealipRemoteAddr => write!(out, "{}", self.client.ip()),
            Var::ServerAddr => write!(out, "{}", self.server.ip()),
            Var::ServerPort => write!(out, "{}", self.server.port()),
            Var::UpstreamAddr => {
                if self.upstream_addr.is_empty() {
                    out.push('-');
                }
                let list: Vec<String> = self.upstream_addr.iter().map(|a| a.to_string()).collect();
                out.push_str(&list.join(", "));
                Ok(())
            }
            Var::BytesSent => write!(out, "{}", self.bytes_sent),
            Var::BytesReceived => write!(out, "{}", self.bytes_received),
            Var::UpstreamBytesSent => write!(out, "{}", self.upstream_bytes_sent),
            Var::UpstreamBytesReceived => write!(out, "{}", self.upstream_bytes_received),
            Var::UpstreamConnectTime => match self.upstream_connect_time {
                Some(t) => write!(out, "{:.3}", t.as_secs_f64()),
                None => write!(out, "-"),
            },
            Var::SessionTime => {
                let t = now.duration_since(self.started).unwrap_or_default();
                write!(out, "{:.3}", t.as_secs_f64())
            }
            Var::Status => write!(out, "{}", self.status),
            Var::TimeLocal => write!(
                out,
                "{}",
                chrono::DateTime::<chrono::Local>::from(now).format("%d/%b/%Y:%H:%M:%S %z")
            ),
            Var::TimeIso8601 => write!(
                out,
                "{}",
                chrono::DateTime::<chrono::Local>::from(now).format("%Y-%m-%dT%H:%M:%S%:z")
            ),
            Var::Msec => {
                let t = now
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                write!(out, "{:.3}", t.as_secs_f64())
            }
            Var::Protocol => write!(out, "{}", if self.udp { "UDP" } else { "TCP" }),
            Var::Connection => write!(out, "{}", self.connection),
            Var::Pid => write!(out, "{}", std::process::id()),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_known_variables() {
        let t =
            Template::parse("$remote_addr:${remote_port} [$protocol] $status $upstream_addr 5$ ok")
                .unwrap();
        let mut v = Vars::new(
            "10.0.0.1:5000".parse().unwrap(),
            "127.0.0.1:80".parse().unwrap(),
            false,
            7,
        );
        v.upstream_addr = vec!["127.0.0.2:81".parse().unwrap()];
        assert_eq!(t.render(&v), "10.0.0.1:5000 [TCP] 200 127.0.0.2:81 5$ ok");
        assert!(t.uses(Var::Status));
    }

    #[test]
    fn rejects_unknown_variables() {
        assert_eq!(
            Template::parse("$nope"),
            Err(VarError::Unknown("nope".into()))
        );
        assert!(matches!(
            Template::parse("${remote_addr"),
            Err(VarError::Unterminated(_))
        ));
    }
}
