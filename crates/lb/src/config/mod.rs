//! The typed configuration: nginx `stream { }` directives turned into checked values.

mod syntax;
mod values;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use syntax::{Directive, Location, SyntaxError};
use values::parse_size;
pub use values::{parse_duration, Cidr};

use crate::vars::Template;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Syntax(#[from] SyntaxError),
    #[error("{loc}: {msg}")]
    Invalid { loc: Location, msg: String },
    #[error("{0}: no \"stream\" block")]
    NoStream(PathBuf),
}

fn invalid(d: &Directive, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        loc: d.loc.clone(),
        msg: msg.into(),
    }
}

fn unsupported(d: &Directive, context: &str) -> ConfigError {
    invalid(
        d,
        format!(
            "unsupported directive \"{}\" in {context} (oxvirt lb does not implement it)",
            d.name
        ),
    )
}

/// The whole file: main context plus the `stream` block.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    /// `worker_processes`: tokio worker threads (1 = a single-threaded runtime).
    pub workers: usize,
    /// `events { worker_connections N; }`: most client sessions at once.
    pub max_sessions: Option<usize>,
    pub pid_file: Option<PathBuf>,
    pub servers: Vec<ServerConf>,
    pub upstreams: Vec<UpstreamConf>,
    pub limit_zones: HashMap<String, Template>,
    /// `runtime_api ADDR | unix:PATH;` (our extension) for the HTTP+JSON API.
    pub runtime_api: Option<ApiListen>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ListenConf {
    pub addr: SocketAddr,
    pub udp: bool,
    pub proxy_protocol: bool,
    pub reuseport: bool,
    pub backlog: i32,
}

#[derive(Debug, Clone)]
pub struct ServerConf {
    pub listens: Vec<ListenConf>,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    pub proxy: Proxy,
    pub health_check: Option<HealthCheck>,
    pub loc: Location,
}

/// The PROXY protocol version sent to upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allow,
    Deny,
}

#[derive(Debug, Clone)]
pub struct AccessLog {
    pub path: PathBuf,
    pub format: Template,
}

/// Per-server proxy settings after inheriting from the `stream` level.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub next_upstream: bool,
    pub next_upstream_tries: u32,
    pub next_upstream_timeout: Duration,
    pub send_proxy_protocol: Option<ProxyVersion>,
    pub upload_rate: u64,
    pub download_rate: u64,
    pub bind: Option<IpAddr>,
    pub half_close: bool,
    pub real_ip_from: Vec<Cidr>,
    pub access: Vec<(Access, Cidr)>,
    pub limit_conn: Vec<(String, u32)>,
    pub access_log: Vec<AccessLog>,
    pub responses: Option<u64>,
    pub buffer_size: usize,
    pub proxy_protocol_timeout: Duration,
}

/// Directives valid at both `stream` and `server` level; unset ones inherit.
#[derive(Debug, Clone, Default)]
struct Settings {
    connect_timeout: Option<Duration>,
    timeout: Option<Duration>,
    next_upstream: Option<bool>,
    next_upstream_tries: Option<u32>,
    next_upstream_timeout: Option<Duration>,
    proxy_protocol: Option<bool>,
    proxy_protocol_version: Option<ProxyVersion>,
    upload_rate: Option<u64>,
    download_rate: Option<u64>,
    bind: Option<Option<IpAddr>>,
    half_close: Option<bool>,
    real_ip_from: Option<Vec<Cidr>>,
    access: Option<Vec<(Access, Cidr)>>,
    limit_conn: Option<Vec<(String, u32)>>,
    access_log: Option<Vec<AccessLog>>,
    responses: Option<u64>,
    buffer_size: Option<usize>,
    proxy_protocol_timeout: Option<Duration>,
}

macro_rules! inherit {
    ($child:expr, $parent:expr, $($field:ident),*) => {
        Settings { $($field: $child.$field.clone().or_else(|| $parent.$field.clone()),)* }
    };
}

impl Settings {
    fn merged(&self, parent: &Settings) -> Settings {
        inherit!(
            self,
            parent,
            connect_timeout,
            timeout,
            next_upstream,
            next_upstream_tries,
            next_upstream_timeout,
            proxy_protocol,
            proxy_protocol_version,
            upload_rate,
            download_rate,
            bind,
            half_close,
            real_ip_from,
            access,
            limit_conn,
            access_log,
            responses,
            buffer_size,
            proxy_protocol_timeout
        )
    }

    fn resolve(self) -> Proxy {
        let send = self
            .proxy_protocol
            .unwrap_or(false)
            .then(|| self.proxy_protocol_version.unwrap_or(ProxyVersion::V1));
        Proxy {
            connect_timeout: self.connect_timeout.unwrap_or(Duration::from_secs(60)),
            timeout: self.timeout.unwrap_or(Duration::from_secs(600)),
            next_upstream: self.next_upstream.unwrap_or(true),
            next_upstream_tries: self.next_upstream_tries.unwrap_or(0),
            next_upstream_timeout: self.next_upstream_timeout.unwrap_or(Duration::ZERO),
            send_proxy_protocol: send,
            upload_rate: self.upload_rate.unwrap_or(0),
            download_rate: self.download_rate.unwrap_or(0),
            bind: self.bind.flatten(),
            half_close: self.half_close.unwrap_or(false),
            real_ip_from: self.real_ip_from.unwrap_or_default(),
            access: self.access.unwrap_or_default(),
            limit_conn: self.limit_conn.unwrap_or_default(),
            access_log: self.access_log.unwrap_or_default(),
            responses: self.responses,
            buffer_size: self.buffer_size.unwrap_or(16 * 1024),
            proxy_protocol_timeout: self
                .proxy_protocol_timeout
                .unwrap_or(Duration::from_secs(30)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    RoundRobin,
    LeastConn,
    Hash { key: Template, consistent: bool },
    Random { two: bool, least_conn: bool },
}

#[derive(Debug, Clone)]
pub struct UpstreamConf {
    pub name: String,
    pub method: Method,
    pub servers: Vec<PeerConf>,
    /// nginx Plus's `state FILE`: the servers live in this file, which the
    /// runtime API rewrites on every change.
    pub state: Option<PathBuf>,
    pub loc: Location,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerConf {
    /// The address as written (`host:port`), which `hash consistent` hashes.
    pub name: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub backup: bool,
    pub down: bool,
    /// nginx Plus's `drain`: no new sessions, open ones go on.
    pub drain: bool,
    pub max_conns: u32,
}

#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub interval: Duration,
    pub fails: u32,
    pub passes: u32,
    pub port: Option<u16>,
    pub check: Option<MatchConf>,
}

#[derive(Debug, Clone)]
pub struct MatchConf {
    pub name: String,
    pub send: Vec<u8>,
    pub expect: Option<Expect>,
}

#[derive(Debug, Clone)]
pub enum Expect {
    Contains(Vec<u8>),
    Regex(regex::bytes::Regex),
}

impl Config {
    /// Reads and checks a configuration file (what `oxvirt lb -t` does).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let tree = syntax::parse_file(path)?;
        Builder::default().build(path, &tree)
    }
}

/// Collects the pieces while walking the tree; servers are resolved at the end
/// because `proxy_pass` may name an upstream defined further down.
#[derive(Default)]
struct Builder {
    workers: Option<usize>,
    max_sessions: Option<usize>,
    pid_file: Option<PathBuf>,
    stream_seen: bool,
    stream_settings: Settings,
    log_formats: HashMap<String, Template>,
    limit_zones: HashMap<String, Template>,
    matches: HashMap<String, MatchConf>,
    upstreams: Vec<UpstreamConf>,
    raw_servers: Vec<RawServer>,
    runtime_api: Option<ApiListen>,
}

struct RawServer {
    listens: Vec<ListenConf>,
    pass: Option<(String, Directive)>,
    settings: Settings,
    health_check: Option<Directive>,
    loc: Location,
}

fn expect_args(d: &Directive, range: std::ops::RangeInclusive<usize>) -> Result<(), ConfigError> {
    if d.block.is_some() {
        return Err(invalid(d, format!("\"{}\" does not take a block", d.name)));
    }
    if !range.contains(&d.args.len()) {
        return Err(invalid(
            d,
            format!("invalid number of arguments in \"{}\"", d.name),
        ));
    }
    Ok(())
}

fn block(d: &Directive) -> Result<&[Directive], ConfigError> {
    d.block
        .as_deref()
        .ok_or_else(|| invalid(d, format!("\"{}\" needs a {{ }} block", d.name)))
}

fn duration_arg(d: &Directive, s: &str) -> Result<Duration, ConfigError> {
    parse_duration(s).ok_or_else(|| invalid(d, format!("invalid time \"{s}\" in \"{}\"", d.name)))
}

fn number_arg<T: std::str::FromStr>(d: &Directive, s: &str) -> Result<T, ConfigError> {
    s.parse()
        .map_err(|_| invalid(d, format!("invalid number \"{s}\" in \"{}\"", d.name)))
}

fn one(d: &Directive) -> Result<&str, ConfigError> {
    expect_args(d, 1..=1).map(|_| d.args[0].as_str())
}

fn on_off(d: &Directive) -> Result<bool, ConfigError> {
    expect_args(d, 1..=1)?;
    match d.args[0].as_str() {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(invalid(
            d,
            format!(
                "invalid value \"{other}\" in \"{}\", expecting \"on\" or \"off\"",
                d.name
            ),
        )),
    }
}

fn parse_socket_addr(
    d: &Directive,
    s: &str,
    default_port: Option<u16>,
) -> Result<Vec<SocketAddr>, ConfigError> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    if let Ok(port) = s.parse::<u16>() {
        return Ok(vec![SocketAddr::from(([0, 0, 0, 0], port))]);
    }
    let with_port = match (s.rsplit_once(':'), default_port) {
        (Some((_, p)), _) if p.parse::<u16>().is_ok() => s.to_string(),
        (_, Some(port)) if !s.contains(':') => format!("{s}:{port}"),
        _ => return Err(invalid(d, format!("no port in \"{s}\" of \"{}\"", d.name))),
    };
    if s.starts_with("unix:") {
        return Err(invalid(
            d,
            format!("unix sockets are not supported in \"{}\"", d.name),
        ));
    }
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .map_err(|e| {
            invalid(
                d,
                format!("host not found in \"{s}\" of \"{}\": {e}", d.name),
            )
        })?
        .collect();
    if addrs.is_empty() {
        return Err(invalid(
            d,
            format!("host not found in \"{s}\" of \"{}\"", d.name),
        ));
    }
    Ok(addrs)
}

impl Builder {
    fn build(mut self, path: &Path, tree: &[Directive]) -> Result<Config, ConfigError> {
        for d in tree {
            self.main_directive(d)?;
        }
        if !self.stream_seen {
            return Err(ConfigError::NoStream(path.to_path_buf()));
        }
        let raw_servers = std::mem::take(&mut self.raw_servers);
        let mut servers = Vec::new();
        for raw in raw_servers {
            servers.push(self.resolve_server(raw)?);
        }
        self.check_listen_conflicts(&servers)?;
        Ok(Config {
            path: path.to_path_buf(),
            workers: self.workers.unwrap_or(1),
            max_sessions: self.max_sessions,
            pid_file: self.pid_file,
            servers,
            upstreams: self.upstreams,
            limit_zones: self.limit_zones,
            runtime_api: self.runtime_api,
        })
    }

    fn main_directive(&mut self, d: &Directive) -> Result<(), ConfigError> {
        match d.name.as_str() {
            "stream" => {
                if self.stream_seen {
                    return Err(invalid(d, "\"stream\" directive is duplicate"));
                }
                self.stream_seen = true;
                for child in block(d)? {
                    self.stream_directive(child)?;
                }
            }
            "worker_processes" => {
                expect_args(d, 1..=1)?;
                self.workers = Some(match d.args[0].as_str() {
                    "auto" => std::thread::available_parallelism().map_or(1, |n| n.get()),
                    n => number_arg::<usize>(d, n)?.max(1),
                });
            }
            "pid" => {
                expect_args(d, 1..=1)?;
                self.pid_file = Some(PathBuf::from(&d.args[0]));
            }
            "load_module" => {
                expect_args(d, 1..=1)?;
                if !d.args[0].contains("ngx_stream_module") {
                    return Err(invalid(
                        d,
                        format!(
                            "cannot load module \"{}\": only the stream module is built in",
                            d.args[0]
                        ),
                    ));
                }
            }
            "events" => {
                for child in block(d)? {
                    match child.name.as_str() {
                        "worker_connections" => {
                            expect_args(child, 1..=1)?;
                            self.max_sessions = Some(number_arg(child, &child.args[0])?);
                        }
                        _ => return Err(unsupported(child, "events")),
                    }
                }
            }
            _ => return Err(unsupported(d, "main context")),
        }
        Ok(())
    }

    fn stream_directive(&mut self, d: &Directive) -> Result<(), ConfigError> {
        match d.name.as_str() {
            "upstream" => self.upstream(d)?,
            "server" => self.server(d)?,
            "log_format" => {
                if d.args.len() < 2 {
                    return Err(invalid(d, "invalid number of arguments in \"log_format\""));
                }
                let mut parts = &d.args[1..];
                if let Some(escape) = parts[0].strip_prefix("escape=") {
                    // Apart from $binary_remote_addr (meant for keys), our variables
                    // never hold quotes, backslashes or control bytes, so "default"
                    // and "none" print the same; "json" is not implemented.
                    if !matches!(escape, "default" | "none") {
                        return Err(invalid(
                            d,
                            format!("unsupported \"log_format\" escape \"{escape}\""),
                        ));
                    }
                    parts = &parts[1..];
                }
                let template =
                    Template::parse(&parts.concat()).map_err(|e| invalid(d, e.to_string()))?;
                if self
                    .log_formats
                    .insert(d.args[0].clone(), template)
                    .is_some()
                {
                    return Err(invalid(
                        d,
                        format!("duplicate \"log_format\" name \"{}\"", d.args[0]),
                    ));
                }
            }
            "limit_conn_zone" => {
                expect_args(d, 2..=2)?;
                let key = Template::parse(&d.args[0]).map_err(|e| invalid(d, e.to_string()))?;
                let zone = d.args[1]
                    .strip_prefix("zone=")
                    .and_then(|z| z.split_once(':'))
                    .filter(|(_, size)| parse_size(size).is_some())
                    .ok_or_else(|| {
                        invalid(
                            d,
                            format!("invalid zone \"{}\", expecting zone=NAME:SIZE", d.args[1]),
                        )
                    })?;
                self.limit_zones.insert(zone.0.to_string(), key);
            }
            "match" => self.match_block(d)?,
            "runtime_api" => {
                expect_args(d, 1..=1)?;
                let arg = &d.args[0];
                self.runtime_api = Some(match arg.strip_prefix("unix:") {
                    Some(path) => ApiListen::Unix(PathBuf::from(path)),
                    None => ApiListen::Tcp(arg.parse().map_err(|_| {
                        invalid(d, format!("invalid address \"{arg}\" in \"runtime_api\""))
                    })?),
                });
            }
            _ => {
                let mut settings = std::mem::take(&mut self.stream_settings);
                let handled = self.setting(&mut settings, d);
                self.stream_settings = settings;
                if !handled? {
                    return Err(unsupported(d, "stream"));
                }
            }
        }
        Ok(())
    }

    /// Handles a directive allowed at both levels; `Ok(false)` if it is not one.
    fn setting(&self, s: &mut Settings, d: &Directive) -> Result<bool, ConfigError> {
        match d.name.as_str() {
            "proxy_connect_timeout" => s.connect_timeout = Some(duration_arg(d, one(d)?)?),
            "proxy_timeout" => s.timeout = Some(duration_arg(d, one(d)?)?),
            "proxy_next_upstream" => s.next_upstream = Some(on_off(d)?),
            "proxy_next_upstream_tries" => s.next_upstream_tries = Some(number_arg(d, one(d)?)?),
            "proxy_next_upstream_timeout" => {
                s.next_upstream_timeout = Some(duration_arg(d, one(d)?)?)
            }
            "proxy_protocol" => s.proxy_protocol = Some(on_off(d)?),
            "proxy_protocol_version" => {
                s.proxy_protocol_version = Some(match one(d)? {
                    "1" => ProxyVersion::V1,
                    "2" => ProxyVersion::V2,
                    other => {
                        return Err(invalid(
                            d,
                            format!("invalid PROXY protocol version \"{other}\", expecting 1 or 2"),
                        ))
                    }
                })
            }
            "proxy_protocol_timeout" => s.proxy_protocol_timeout = Some(duration_arg(d, one(d)?)?),
            "proxy_upload_rate" => s.upload_rate = Some(self.size_arg(d, one(d)?)?),
            "proxy_download_rate" => s.download_rate = Some(self.size_arg(d, one(d)?)?),
            "proxy_buffer_size" => {
                s.buffer_size =
                    Some(usize::try_from(self.size_arg(d, one(d)?)?.max(1)).unwrap_or(usize::MAX))
            }
            "proxy_half_close" => s.half_close = Some(on_off(d)?),
            "proxy_responses" => s.responses = Some(number_arg(d, one(d)?)?),
            "proxy_bind" => {
                let arg = one(d)?;
                s.bind = Some(match arg {
                    "off" => None,
                    ip => Some(ip.parse().map_err(|_| {
                        invalid(d, format!("invalid address \"{ip}\" in \"proxy_bind\" (only a literal IP is supported)"))
                    })?),
                });
            }
            "set_real_ip_from" => {
                let cidr = Cidr::parse(one(d)?)
                    .ok_or_else(|| invalid(d, format!("invalid network \"{}\"", d.args[0])))?;
                s.real_ip_from.get_or_insert_with(Vec::new).push(cidr);
            }
            "allow" | "deny" => {
                let arg = one(d)?;
                let cidr = if arg == "all" {
                    Some(Cidr::ALL)
                } else {
                    Cidr::parse(arg)
                }
                .ok_or_else(|| {
                    invalid(d, format!("invalid parameter \"{arg}\" in \"{}\"", d.name))
                })?;
                let rule = if d.name == "allow" {
                    Access::Allow
                } else {
                    Access::Deny
                };
                s.access.get_or_insert_with(Vec::new).push((rule, cidr));
            }
            "limit_conn" => {
                expect_args(d, 2..=2)?;
                if !self.limit_zones.contains_key(&d.args[0]) {
                    return Err(invalid(
                        d,
                        format!("unknown limit_conn_zone \"{}\"", d.args[0]),
                    ));
                }
                let n: u32 = number_arg(d, &d.args[1])?;
                s.limit_conn
                    .get_or_insert_with(Vec::new)
                    .push((d.args[0].clone(), n));
            }
            "access_log" => self.access_log(s, d)?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn size_arg(&self, d: &Directive, s: &str) -> Result<u64, ConfigError> {
        parse_size(s).ok_or_else(|| invalid(d, format!("invalid size \"{s}\" in \"{}\"", d.name)))
    }

    fn access_log(&self, s: &mut Settings, d: &Directive) -> Result<(), ConfigError> {
        if d.args.is_empty() || d.block.is_some() {
            return Err(invalid(d, "invalid number of arguments in \"access_log\""));
        }
        if d.args[0] == "off" {
            s.access_log = Some(Vec::new());
            return Ok(());
        }
        let format_name = d.args.get(1).ok_or_else(|| {
            invalid(
                d,
                "\"access_log\" needs a format name (stream has no default format)",
            )
        })?;
        if let Some(extra) = d.args.get(2) {
            return Err(invalid(
                d,
                format!("unsupported \"access_log\" parameter \"{extra}\""),
            ));
        }
        let format = self
            .log_formats
            .get(format_name)
            .ok_or_else(|| invalid(d, format!("unknown log format \"{format_name}\"")))?
            .clone();
        s.access_log.get_or_insert_with(Vec::new).push(AccessLog {
            path: PathBuf::from(&d.args[0]),
            format,
        });
        Ok(())
    }

    fn match_block(&mut self, d: &Directive) -> Result<(), ConfigError> {
        let [name] = d.args.as_slice() else {
            return Err(invalid(d, "\"match\" takes one name"));
        };
        let mut m = MatchConf {
            name: name.clone(),
            send: Vec::new(),
            expect: None,
        };
        for child in block(d)? {
            match child.name.as_str() {
                "send" => {
                    expect_args(child, 1..=1)?;
                    m.send = values::hex_unescape(&child.args[0]);
                }
                "expect" => {
                    expect_args(child, 1..=2)?;
                    m.expect = Some(match child.args.as_slice() {
                        [tilde, re] if tilde == "~" => Expect::Regex(
                            regex::bytes::Regex::new(re)
                                .map_err(|e| invalid(child, format!("invalid regex: {e}")))?,
                        ),
                        [lit] => Expect::Contains(values::hex_unescape(lit)),
                        _ => {
                            return Err(invalid(
                                child,
                                "expecting `expect \"string\"` or `expect ~ \"regex\"`",
                            ))
                        }
                    });
                }
                _ => return Err(unsupported(child, "match")),
            }
        }
        self.matches.insert(name.clone(), m);
        Ok(())
    }

    fn upstream(&mut self, d: &Directive) -> Result<(), ConfigError> {
        let [name] = d.args.as_slice() else {
            return Err(invalid(d, "\"upstream\" takes one name"));
        };
        if self.upstreams.iter().any(|u| &u.name == name) {
            return Err(invalid(d, format!("duplicate upstream \"{name}\"")));
        }
        let mut up = UpstreamConf {
            name: name.clone(),
            method: Method::RoundRobin,
            servers: Vec::new(),
            state: None,
            loc: d.loc.clone(),
        };
        let mut method_loc: Option<&Directive> = None;
        let mut server_loc: Option<&Directive> = None;
        for child in block(d)? {
            let method = match child.name.as_str() {
                "server" => {
                    up.servers.extend(peer(child)?);
                    server_loc.get_or_insert(child);
                    continue;
                }
                "state" => {
                    expect_args(child, 1..=1)?;
                    if up.state.is_some() {
                        return Err(invalid(child, "\"state\" directive is duplicate"));
                    }
                    up.state = Some(relative_to(child, &child.args[0]));
                    continue;
                }
                "zone" => {
                    // One process shares all state already; the zone is accepted as a no-op.
                    expect_args(child, 1..=2)?;
                    continue;
                }
                "least_conn" => {
                    expect_args(child, 0..=0)?;
                    Method::LeastConn
                }
                "hash" => {
                    expect_args(child, 1..=2)?;
                    let key = Template::parse(&child.args[0])
                        .map_err(|e| invalid(child, e.to_string()))?;
                    let consistent = match child.args.get(1).map(String::as_str) {
                        None => false,
                        Some("consistent") => true,
                        Some(other) => {
                            return Err(invalid(child, format!("invalid parameter \"{other}\"")))
                        }
                    };
                    Method::Hash { key, consistent }
                }
                "random" => {
                    expect_args(child, 0..=2)?;
                    match child
                        .args
                        .iter()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .as_slice()
                    {
                        [] => Method::Random {
                            two: false,
                            least_conn: false,
                        },
                        ["two"] => Method::Random {
                            two: true,
                            least_conn: false,
                        },
                        ["two", "least_conn"] => Method::Random {
                            two: true,
                            least_conn: true,
                        },
                        _ => return Err(invalid(child, "expecting `random [two [least_conn]]`")),
                    }
                }
                _ => return Err(unsupported(child, "upstream")),
            };
            if let Some(prev) = method_loc {
                return Err(invalid(
                    child,
                    format!("load balancing method redefined (first at {})", prev.loc),
                ));
            }
            method_loc = Some(child);
            up.method = method;
        }
        match (&up.state, server_loc) {
            (Some(_), Some(server)) => {
                return Err(invalid(
                    server,
                    "\"server\" cannot be used in an upstream with \"state\" (the servers live in the state file)",
                ))
            }
            (Some(path), None) => up.servers = read_state(path)?,
            (None, _) if up.servers.is_empty() => {
                return Err(invalid(
                    d,
                    format!("no servers are inside upstream \"{name}\""),
                ))
            }
            (None, _) => {}
        }
        if !matches!(up.method, Method::RoundRobin | Method::LeastConn)
            && up.servers.iter().any(|s| s.backup)
        {
            return Err(invalid(
                d,
                format!(
                    "upstream \"{name}\": \"backup\" works only with round robin and least_conn"
                ),
            ));
        }
        self.upstreams.push(up);
        Ok(())
    }

    fn server(&mut self, d: &Directive) -> Result<(), ConfigError> {
        if !d.args.is_empty() {
            return Err(invalid(d, "stream \"server\" takes no arguments"));
        }
        let mut raw = RawServer {
            listens: Vec::new(),
            pass: None,
            settings: Settings::default(),
            health_check: None,
            loc: d.loc.clone(),
        };
        for child in block(d)? {
            match child.name.as_str() {
                "listen" => raw.listens.push(listen(child)?),
                "proxy_pass" => {
                    expect_args(child, 1..=1)?;
                    if raw.pass.is_some() {
                        return Err(invalid(child, "\"proxy_pass\" directive is duplicate"));
                    }
                    if child.args[0].contains('$') {
                        return Err(invalid(
                            child,
                            "variables in \"proxy_pass\" are not supported",
                        ));
                    }
                    raw.pass = Some((child.args[0].clone(), child.clone()));
                }
                "health_check" => raw.health_check = Some(child.clone()),
                _ => {
                    if !self.setting(&mut raw.settings, child)? {
                        return Err(unsupported(child, "server"));
                    }
                }
            }
        }
        if raw.listens.is_empty() {
            return Err(invalid(d, "server has no \"listen\""));
        }
        self.raw_servers.push(raw);
        Ok(())
    }

    fn resolve_server(&mut self, raw: RawServer) -> Result<ServerConf, ConfigError> {
        let Some((target, pass_d)) = raw.pass else {
            return Err(ConfigError::Invalid {
                loc: raw.loc,
                msg: "server has no \"proxy_pass\"".into(),
            });
        };
        let upstream = match self.upstreams.iter().position(|u| u.name == target) {
            Some(i) => i,
            None => self.implicit_upstream(&target, &pass_d)?,
        };
        let health_check = raw
            .health_check
            .as_ref()
            .map(|d| self.health_check(d))
            .transpose()?;
        Ok(ServerConf {
            listens: raw.listens,
            upstream,
            proxy: raw.settings.merged(&self.stream_settings).resolve(),
            health_check,
            loc: raw.loc,
        })
    }

    /// `proxy_pass host:port` makes a one-off upstream, as nginx does.
    fn implicit_upstream(&mut self, target: &str, d: &Directive) -> Result<usize, ConfigError> {
        let addrs = parse_socket_addr(d, target, None).map_err(|_| {
            invalid(
                d,
                format!("\"{target}\" is neither an upstream name nor an address with a port"),
            )
        })?;
        self.upstreams.push(UpstreamConf {
            name: target.to_string(),
            method: Method::RoundRobin,
            servers: addrs
                .into_iter()
                .map(|addr| PeerConf::new(target.to_string(), addr))
                .collect(),
            state: None,
            loc: d.loc.clone(),
        });
        Ok(self.upstreams.len() - 1)
    }

    fn health_check(&self, d: &Directive) -> Result<HealthCheck, ConfigError> {
        let mut hc = HealthCheck {
            interval: Duration::from_secs(5),
            fails: 1,
            passes: 1,
            port: None,
            check: None,
        };
        for arg in &d.args {
            let (key, value) = arg.split_once('=').unwrap_or((arg, ""));
            match key {
                "interval" => hc.interval = duration_arg(d, value)?,
                "fails" => hc.fails = number_arg::<u32>(d, value)?.max(1),
                "passes" => hc.passes = number_arg::<u32>(d, value)?.max(1),
                "port" => hc.port = Some(number_arg(d, value)?),
                "match" => {
                    let m = self
                        .matches
                        .get(value)
                        .ok_or_else(|| invalid(d, format!("unknown match \"{value}\"")))?;
                    hc.check = Some(m.clone());
                }
                _ => {
                    return Err(invalid(
                        d,
                        format!("unsupported \"health_check\" parameter \"{arg}\""),
                    ))
                }
            }
        }
        if hc.interval.is_zero() {
            return Err(invalid(d, "\"health_check\" interval must be above zero"));
        }
        Ok(hc)
    }

    fn check_listen_conflicts(&self, servers: &[ServerConf]) -> Result<(), ConfigError> {
        let mut seen: HashMap<(SocketAddr, bool), &Location> = HashMap::new();
        for server in servers {
            for l in &server.listens {
                if let Some(first) = seen.insert((l.addr, l.udp), &server.loc) {
                    return Err(ConfigError::Invalid {
                        loc: server.loc.clone(),
                        msg: format!(
                            "duplicate \"{}{}\" address and port pair (first at {first})",
                            l.addr,
                            if l.udp { " udp" } else { "" }
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

impl PeerConf {
    /// A server with nginx's defaults (weight 1, max_fails 1, fail_timeout 10s).
    pub fn new(name: String, addr: SocketAddr) -> PeerConf {
        PeerConf {
            name,
            addr,
            weight: 1,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            backup: false,
            down: false,
            drain: false,
            max_conns: 0,
        }
    }
}

fn peer(d: &Directive) -> Result<Vec<PeerConf>, ConfigError> {
    let Some((target, params)) = d.args.split_first() else {
        return Err(invalid(d, "\"server\" needs an address"));
    };
    let addrs = parse_socket_addr(d, target, None)?;
    let mut template = PeerConf::new(target.clone(), addrs[0]);
    for p in params {
        let (key, value) = p.split_once('=').unwrap_or((p, ""));
        match key {
            "weight" => {
                template.weight = number_arg(d, value)?;
                if template.weight == 0 {
                    return Err(invalid(d, "weight must be at least 1"));
                }
            }
            "max_fails" => template.max_fails = number_arg(d, value)?,
            "fail_timeout" => template.fail_timeout = duration_arg(d, value)?,
            "max_conns" => template.max_conns = number_arg(d, value)?,
            "backup" if value.is_empty() => template.backup = true,
            "down" if value.is_empty() => template.down = true,
            "drain" if value.is_empty() => template.drain = true,
            _ => return Err(invalid(d, format!("unsupported server parameter \"{p}\""))),
        }
    }
    Ok(addrs
        .into_iter()
        .map(|addr| PeerConf {
            addr,
            ..template.clone()
        })
        .collect())
}

/// A path as nginx resolves it here: relative to the file the directive is in.
fn relative_to(d: &Directive, path: &str) -> PathBuf {
    let path = Path::new(path);
    match d.loc.file.parent() {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_path_buf(),
    }
}

/// The servers of a `state` file: `server` lines only. A missing file is an
/// upstream without servers yet (they come through the API).
fn read_state(path: &Path) -> Result<Vec<PeerConf>, ConfigError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let mut servers = Vec::new();
    for d in syntax::parse_file(path)? {
        if d.name != "server" {
            return Err(invalid(
                &d,
                format!(
                    "unexpected \"{}\" in a state file (only \"server\" lines)",
                    d.name
                ),
            ));
        }
        expect_args(&d, 1..=usize::MAX)?;
        servers.extend(peer(&d)?);
    }
    Ok(servers)
}

fn listen(d: &Directive) -> Result<ListenConf, ConfigError> {
    let Some((target, params)) = d.args.split_first() else {
        return Err(invalid(d, "\"listen\" needs an address"));
    };
    let addrs = parse_socket_addr(d, target, None)?;
    let mut l = ListenConf {
        addr: addrs[0],
        udp: false,
        proxy_protocol: false,
        reuseport: false,
        backlog: 511,
    };
    for p in params {
        match p.split_once('=') {
            None if p == "udp" => l.udp = true,
            None if p == "proxy_protocol" => l.proxy_protocol = true,
            None if p == "reuseport" => l.reuseport = true,
            None if p == "bind" => {}
            Some(("backlog", n)) => l.backlog = number_arg(d, n)?,
            _ => {
                return Err(invalid(
                    d,
                    format!("unsupported \"listen\" parameter \"{p}\""),
                ))
            }
        }
    }
    Ok(l)
}

#[cfg(test)]
mod tests;
