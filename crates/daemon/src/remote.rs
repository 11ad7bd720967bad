//! The API for other hosts: `oxvirt daemon --listen tcp:ADDR:PORT` serves
//! the same routes over TCP, every request authenticated with a shared
//! secret (`Authorization: Bearer TOKEN`, the token file the admin made);
//! with `--tls-cert`/`--tls-key` inside TLS (rustls), which clients check
//! against the CA file they are given. Plain TCP belongs on trusted
//! networks only. Also the `--connect` URIs clients use to pick a daemon.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;

use crate::api::ErrorBody;
use crate::paths::{Mode, Paths, PathsError};

/// libvirt's port for plain TCP, the default of `oxvirt+tcp://HOST/...`.
pub const DEFAULT_PORT: u16 = 16509;
/// libvirt's port for TLS, the default of `oxvirt+tls://HOST/...`.
pub const DEFAULT_TLS_PORT: u16 = 16514;
/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Shorter secrets are refused: they can be guessed.
const MIN_TOKEN_LEN: usize = 16;

/// Errors with remote URIs, listen addresses and tokens.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("connection URI {uri:?}: {reason}")]
    BadUri { uri: String, reason: &'static str },
    #[error(transparent)]
    Paths(#[from] PathsError),
    #[error("--listen {0:?}: expected tcp:ADDRESS:PORT (an IP address; port 0 picks a free one)")]
    BadListen(String),
    #[error("{path}: {source}")]
    TokenIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file {path}: {reason}")]
    BadToken { path: PathBuf, reason: String },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {path}: {reason}")]
    Tls { path: PathBuf, reason: String },
}

/// Which daemon a client talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectUri {
    /// A daemon on this host, by its API socket.
    Unix(PathBuf),
    /// A daemon's `--listen` address on another host.
    Tcp { host: String, port: u16 },
    /// The same inside TLS.
    Tls { host: String, port: u16 },
}

impl ConnectUri {
    /// `oxvirt:///system`, `oxvirt:///session`, a socket path,
    /// `unix:///path`, or `oxvirt+tcp://HOST[:PORT]/system` (the path names
    /// the instance, as in libvirt; the listening daemon is the one served).
    pub fn parse(uri: &str) -> Result<Self, RemoteError> {
        let bad = |reason| RemoteError::BadUri {
            uri: uri.to_owned(),
            reason,
        };
        match uri {
            "oxvirt:///system" => return Ok(Self::Unix(Paths::for_mode(Mode::System)?.socket())),
            "oxvirt:///session" => return Ok(Self::Unix(Paths::for_mode(Mode::Session)?.socket())),
            _ => {}
        }
        if uri.starts_with('/') || uri.starts_with('.') {
            return Ok(Self::Unix(PathBuf::from(uri)));
        }
        if let Some(path) = uri.strip_prefix("unix://") {
            return match path.starts_with('/') {
                true => Ok(Self::Unix(PathBuf::from(path))),
                false => Err(bad("unix:// needs an absolute path")),
            };
        }
        let (rest, tls) = match (
            uri.strip_prefix("oxvirt+tcp://"),
            uri.strip_prefix("oxvirt+tls://"),
        ) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            _ => return Err(bad("expected oxvirt:///system, oxvirt:///session, a socket path, oxvirt+tcp://HOST:PORT/system or oxvirt+tls://HOST:PORT/system")),
        };
        let (authority, instance) = rest.split_once('/').unwrap_or((rest, ""));
        if !matches!(instance, "" | "system" | "session") {
            return Err(bad("the path after HOST:PORT must be /system or /session"));
        }
        let (host, port) = split_host_port(authority)
            .ok_or_else(|| bad("expected HOST or HOST:PORT (IPv6 as [ADDR]:PORT)"))?;
        let port = match port {
            Some(p) => p
                .parse()
                .map_err(|_| bad("the port is not a number from 1 to 65535"))?,
            None if tls => DEFAULT_TLS_PORT,
            None => DEFAULT_PORT,
        };
        if port == 0 {
            return Err(bad("the port is not a number from 1 to 65535"));
        }
        let host = host.to_owned();
        Ok(match tls {
            true => Self::Tls { host, port },
            false => Self::Tcp { host, port },
        })
    }

    /// The host and port of a remote daemon.
    pub fn remote(&self) -> Option<(&str, u16)> {
        match self {
            Self::Tcp { host, port } | Self::Tls { host, port } => Some((host, *port)),
            Self::Unix(_) => None,
        }
    }
}

impl std::fmt::Display for ConnectUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "{}", path.display()),
            Self::Tcp { host, port } | Self::Tls { host, port } => {
                let scheme = match self {
                    Self::Tls { .. } => "tls",
                    _ => "tcp",
                };
                match host.contains(':') {
                    true => write!(f, "oxvirt+{scheme}://[{host}]:{port}/system"),
                    false => write!(f, "oxvirt+{scheme}://{host}:{port}/system"),
                }
            }
        }
    }
}

/// `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT`; None when malformed.
fn split_host_port(authority: &str) -> Option<(&str, Option<&str>)> {
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':')?),
        };
        return (!host.is_empty()).then_some((host, port));
    }
    let (host, port) = match authority.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    };
    (!host.is_empty() && !host.contains(['@', '?', '#'])).then_some((host, port))
}

/// The daemon's `--listen tcp:ADDRESS:PORT`.
pub fn parse_listen(text: &str) -> Result<SocketAddr, RemoteError> {
    let bad = || RemoteError::BadListen(text.to_owned());
    let rest = text.strip_prefix("tcp:").ok_or_else(bad)?;
    let (host, port) = match split_host_port(rest) {
        Some((host, Some(port))) => (host, port),
        _ => return Err(bad()),
    };
    let ip: IpAddr = host.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(SocketAddr::new(ip, port))
}

/// The shared secret of the remote API.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// The token in `path` (surrounding whitespace dropped); it must be at
    /// least 16 characters of visible ASCII.
    pub fn read(path: &Path) -> Result<Self, RemoteError> {
        let text = std::fs::read_to_string(path).map_err(|source| RemoteError::TokenIo {
            path: path.to_owned(),
            source,
        })?;
        Self::from_text(text.trim()).map_err(|reason| RemoteError::BadToken {
            path: path.to_owned(),
            reason,
        })
    }

    /// The daemon's token file: like [`Token::read`], and readable by its
    /// owner only (the secret guards every domain on the host).
    pub fn read_private(path: &Path) -> Result<Self, RemoteError> {
        let meta = std::fs::metadata(path).map_err(|source| RemoteError::TokenIo {
            path: path.to_owned(),
            source,
        })?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(RemoteError::BadToken {
                path: path.to_owned(),
                reason: format!("mode {:o} lets others read it; chmod 600 it", mode & 0o777),
            });
        }
        Self::read(path)
    }

    pub fn from_text(text: &str) -> Result<Self, String> {
        if text.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "the token has {} characters, at least {MIN_TOKEN_LEN} are needed",
                text.len()
            ));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be visible ASCII characters without spaces".into());
        }
        Ok(Token(text.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compares in time that does not depend on where `given` differs.
    fn matches(&self, given: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        let mut diff = u8::from(given.len() != expected.len());
        for (i, &e) in expected.iter().enumerate() {
            let g = given.get(i).copied().unwrap_or(!e);
            diff |= std::hint::black_box(e ^ g);
        }
        diff == 0
    }
}

/// Marks a request that came over TCP: an incoming migration then listens
/// for the guest on TCP too, on this address.
#[derive(Debug, Clone, Copy)]
pub struct RemoteOrigin {
    pub listen_ip: IpAddr,
}

/// The API's routes behind token authentication, for the TCP listener.
pub fn router(api: Router, token: Token, listen: SocketAddr) -> Router {
    api.layer(Extension(RemoteOrigin {
        listen_ip: listen.ip(),
    }))
    .layer(axum::middleware::from_fn(move |request, next| {
        authenticate(token.clone(), request, next)
    }))
}

async fn authenticate(token: Token, request: Request, next: Next) -> Response {
    let problem = match request.headers().get(header::AUTHORIZATION) {
        None => "missing `Authorization: Bearer TOKEN` header: this API needs the daemon's token",
        Some(value) => match value.as_bytes().strip_prefix(b"Bearer ") {
            None => "malformed Authorization header: expected `Bearer TOKEN`",
            Some(given) if token.matches(given.trim_ascii()) => return next.run(request).await,
            Some(_) => "wrong token",
        },
    };
    tracing::warn!(path = %request.uri().path(), problem, "remote API request refused");
    let body = ErrorBody {
        code: "unauthorized".into(),
        message: problem.into(),
        domain: None,
        field: Some("authorization".into()),
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(body),
    )
        .into_response()
}

/// Where the daemon records the address it listens on (port 0 picks one).
pub fn listen_file(paths: &Paths) -> PathBuf {
    paths.run_dir.join("oxvirtd.tcp")
}

/// The daemon's `--listen`, `--token-file` and `--tls-cert`/`--tls-key`.
#[derive(Debug, Clone)]
pub struct RemoteListen {
    pub addr: SocketAddr,
    pub token_file: PathBuf,
    /// The server's certificate chain and private key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// The remote API's socket, bound, with the token it checks.
pub struct RemoteListener {
    pub listener: tokio::net::TcpListener,
    pub token: Token,
    pub addr: SocketAddr,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl RemoteListen {
    /// The default token file: `STATE/remote.token`.
    pub fn default_token_file(paths: &Paths) -> PathBuf {
        paths.state_dir.join("remote.token")
    }

    /// Reads the token (refusing a missing, short or shared one), binds
    /// the address and records the bound address in `RUN/oxvirtd.tcp`.
    pub async fn bind(&self, paths: &Paths) -> Result<RemoteListener, RemoteError> {
        let token = Token::read_private(&self.token_file)?;
        let tls = match &self.tls {
            Some((cert, key)) => Some(tls_acceptor(cert, key)?),
            None => None,
        };
        let io = |source| RemoteError::Listen {
            addr: self.addr,
            source,
        };
        let listener = tokio::net::TcpListener::bind(self.addr).await.map_err(io)?;
        let addr = listener.local_addr().map_err(io)?;
        let file = listen_file(paths);
        std::fs::write(&file, format!("{addr}\n"))
            .map_err(|source| RemoteError::TokenIo { path: file, source })?;
        match tls {
            Some(_) => tracing::info!(%addr, "remote API listening on TLS"),
            None => {
                tracing::warn!(%addr, "remote API listening on TCP without TLS: keep it on a trusted network")
            }
        }
        Ok(RemoteListener {
            listener,
            token,
            addr,
            tls,
        })
    }
}

fn tls_error(path: &Path, reason: impl std::fmt::Display) -> RemoteError {
    RemoteError::Tls {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// The certificates in PEM text (at least one); `origin` names it.
fn parse_certs(pem: &[u8], origin: &Path) -> Result<Vec<CertificateDer<'static>>, RemoteError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(origin, e))?;
    match certs.is_empty() {
        true => Err(tls_error(origin, "no CERTIFICATE in it")),
        false => Ok(certs),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, RemoteError> {
    let pem = std::fs::read(path).map_err(|source| RemoteError::TokenIo {
        path: path.to_owned(),
        source,
    })?;
    parse_certs(&pem, path)
}

/// The server side: its certificate chain and key.
fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, RemoteError> {
    let chain = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| tls_error(key, e))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| tls_error(cert, e))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The client side: trusts the certificates in PEM text `ca` (a CA's,
/// which signed the server's), and only those; `origin` names it.
pub fn tls_connector(ca: &[u8], origin: &Path) -> Result<tokio_rustls::TlsConnector, RemoteError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in parse_certs(ca, origin)? {
        roots.add(cert).map_err(|e| tls_error(origin, e))?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Accepts TCP connections and runs their TLS handshakes apart, so a slow
/// or silent client holds up only itself.
pub struct TlsListener {
    addr: SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(
        listener: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        addr: SocketAddr,
    ) -> Self {
        let (tx, ready) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "remote API accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, done) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            // The server is gone when nobody receives.
                            let _ = done.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        TlsListener { addr, ready }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_name_a_socket_or_a_tcp_daemon() {
        assert_eq!(
            ConnectUri::parse("/tmp/x.sock").unwrap(),
            ConnectUri::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            ConnectUri::parse("unix:///tmp/y.sock").unwrap(),
            ConnectUri::Unix("/tmp/y.sock".into())
        );
        assert_eq!(
            ConnectUri::parse("oxvirt+tcp://10.0.0.2:4000/system").unwrap(),
            ConnectUri::Tcp {
                host: "10.0.0.2".into(),
                port: 4000
            }
        );
        assert_eq!(
            ConnectUri::parse("oxvirt+tcp://host.example").unwrap(),
            ConnectUri::Tcp {
                host: "host.example".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(
            ConnectUri::parse("oxvirt+tls://h/system").unwrap(),
            ConnectUri::Tls {
                host: "h".into(),
                port: DEFAULT_TLS_PORT
            }
        );
        let v6 = ConnectUri::parse("oxvirt+tcp://[::1]:99/session").unwrap();
        assert_eq!(v6.to_string(), "oxvirt+tcp://[::1]:99/system");
        for (bad, why) in [
            ("qemu:///system", "expected oxvirt:///system"),
            ("oxvirt+tcp://h:0/system", "port"),
            ("oxvirt+tcp://h:99999/system", "port"),
            ("oxvirt+tcp://h:1/other", "/system or /session"),
            ("oxvirt+tcp://:1/system", "HOST"),
            ("oxvirt+tcp://[::1/system", "HOST"),
            ("oxvirt+tcp://u@h:1/system", "HOST"),
            ("unix://rel.sock", "absolute"),
        ] {
            let err = ConnectUri::parse(bad).unwrap_err().to_string();
            assert!(err.contains(why) && err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("tcp:127.0.0.1:0").unwrap(),
            "127.0.0.1:0".parse().unwrap()
        );
        assert_eq!(
            parse_listen("tcp:[::1]:16509").unwrap(),
            "[::1]:16509".parse().unwrap()
        );
        for bad in [
            "127.0.0.1:1",
            "tcp:localhost:1",
            "tcp:1.2.3.4",
            "tcp:1.2.3.4:x",
        ] {
            assert!(parse_listen(bad).unwrap_err().to_string().contains(bad));
        }
    }

    #[test]
    fn tokens_compare_whole() {
        let t = Token::from_text("0123456789abcdef").unwrap();
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeF"));
        assert!(!t.matches(b"0123456789abcde"));
        assert!(!t.matches(b"0123456789abcdef0"));
        assert!(!t.matches(b""));
        assert!(Token::from_text("short")
            .unwrap_err()
            .contains("at least 16"));
        assert!(Token::from_text("0123456789 abcdef").is_err());
    }

    #[test]
    fn the_daemon_token_file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Token::read_private(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600") && err.contains("token"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            Token::read_private(&path).unwrap().as_str(),
            "0123456789abcdef"
        );
        let err = Token::read(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("none"), "{err}");
    }
}
