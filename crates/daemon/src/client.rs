//! A client for the daemon's API: one HTTP request per call over its unix
//! socket, or over TCP with a token (see `remote`). The CLI's verbs, the
//! source daemon of a migration and the tests use it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::api::ErrorBody;
use crate::blkio::{BlkioTune, BlockStats, InterfaceStats};
use crate::devices::DiskThrottle;
use crate::manager::{DomainInfo, DomainSummary, StateInfo};
use crate::migrate::{Incoming, MigrateParameters, MigrateRequest};
use crate::remote::{tls_connector, ConnectUri, RemoteError, Token};
use crate::settings::{Modify, Sizing, VcpuPin};
use crate::snapshot::SnapshotInfo;
use crate::tune::{MemTune, SchedInfo};

/// Errors calling the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to oxvirtd at {target} (is `oxvirt daemon` running{}?): {source}", if target.starts_with("oxvirt+") { " with --listen" } else { "" })]
    Connect {
        target: String,
        source: std::io::Error,
    },
    #[error("talking to oxvirtd at {target}: {source}")]
    Http {
        target: String,
        source: hyper::Error,
    },
    #[error("{}", .0.message)]
    Api(ErrorBody),
    #[error("oxvirtd answered {status} with an unreadable body: {body}")]
    Decode { status: u16, body: String },
}

impl ClientError {
    /// The API's error code, for callers that react to one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api(body) => Some(&body.code),
            _ => None,
        }
    }
}

/// How long connecting to a remote daemon may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream to the daemon, over a unix socket or TCP.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A connection target: the daemon's socket, or its TCP address with the
/// token it wants (and, for TLS, the certificates to trust).
#[derive(Clone)]
pub struct Client {
    uri: ConnectUri,
    token: Option<Token>,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client({})", self.uri)
    }
}

impl Client {
    /// The daemon on this host behind `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            uri: ConnectUri::Unix(socket.into()),
            token: None,
            tls: None,
        }
    }

    /// The daemon `uri` names; `token` is sent to a TCP one.
    pub fn for_uri(uri: ConnectUri, token: Option<Token>) -> Self {
        Client {
            uri,
            token,
            tls: None,
        }
    }

    /// Trusts the CA certificates in `ca_file` for an `oxvirt+tls://` daemon.
    pub fn with_ca_file(self, ca_file: &Path) -> Result<Self, RemoteError> {
        let pem = std::fs::read(ca_file).map_err(|source| RemoteError::TokenIo {
            path: ca_file.to_owned(),
            source,
        })?;
        self.with_ca_pem(&pem, ca_file)
    }

    /// The same with the PEM text (`origin` names it in errors).
    pub fn with_ca_pem(mut self, pem: &[u8], origin: &Path) -> Result<Self, RemoteError> {
        self.tls = Some(tls_connector(pem, origin)?);
        Ok(self)
    }

    pub fn uri(&self) -> &ConnectUri {
        &self.uri
    }

    fn connect_error(&self, source: std::io::Error) -> ClientError {
        ClientError::Connect {
            target: self.uri.to_string(),
            source,
        }
    }

    fn http_error(&self, source: hyper::Error) -> ClientError {
        ClientError::Http {
            target: self.uri.to_string(),
            source,
        }
    }

    async fn connect(&self) -> Result<TokioIo<Box<dyn Stream>>, ClientError> {
        let stream: Box<dyn Stream> = match &self.uri {
            ConnectUri::Unix(socket) => Box::new(
                UnixStream::connect(socket)
                    .await
                    .map_err(|e| self.connect_error(e))?,
            ),
            ConnectUri::Tcp { host, port } => Box::new(self.tcp(host, *port).await?),
            ConnectUri::Tls { host, port } => {
                let Some(connector) = &self.tls else {
                    return Err(self.connect_error(std::io::Error::other(
                        "oxvirt+tls:// needs the certificate to trust (--ca-file or $OXVIRT_CA_FILE)",
                    )));
                };
                let name = rustls_name(host).map_err(|e| self.connect_error(e))?;
                let tcp = self.tcp(host, *port).await?;
                let handshake = connector.connect(name, tcp);
                Box::new(
                    tokio::time::timeout(CONNECT_TIMEOUT, handshake)
                        .await
                        .map_err(|_| self.connect_error(std::io::ErrorKind::TimedOut.into()))?
                        .map_err(|e| self.connect_error(e))?,
                )
            }
        };
        Ok(TokioIo::new(stream))
    }

    async fn tcp(&self, host: &str, port: u16) -> Result<TcpStream, ClientError> {
        let connect = TcpStream::connect((host, port));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| self.connect_error(std::io::ErrorKind::TimedOut.into()))?
            .map_err(|e| self.connect_error(e))?;
        // Best effort: small requests go out at once.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// A request with the headers every call carries.
    fn request(&self, method: Method) -> hyper::http::request::Builder {
        let builder = Request::builder().method(method).header("host", "oxvirtd");
        match &self.token {
            Some(token) => builder.header("authorization", format!("Bearer {}", token.as_str())),
            None => builder,
        }
    }

    /// One request; a non-2xx answer becomes [`ClientError::Api`].
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, ClientError> {
        let http = |source| self.http_error(source);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(self.connect().await?)
            .await
            .map_err(http)?;
        tokio::spawn(connection);
        let payload = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let request = self
            .request(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Full::new(payload))
            .map_err(|e| ClientError::Decode {
                status: 0,
                body: e.to_string(),
            })?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(http)?
            .to_bytes();
        let decode = || ClientError::Decode {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&bytes).into_owned(),
        };
        if !status.is_success() {
            return Err(ClientError::Api(
                serde_json::from_slice(&bytes).map_err(|_| decode())?,
            ));
        }
        serde_json::from_slice(&bytes).map_err(|_| decode())
    }

    pub async fn version(&self) -> Result<Value, ClientError> {
        self.call(Method::GET, "/v1/version", None).await
    }

    pub async fn list(&self, all: bool) -> Result<Vec<DomainSummary>, ClientError> {
        self.call(Method::GET, &format!("/v1/domains?all={all}"), None)
            .await
    }

    pub async fn define(&self, config: &str, origin: &str) -> Result<DomainInfo, ClientError> {
        self.call(
            Method::POST,
            "/v1/domains",
            Some(json!({"config": config, "origin": origin})),
        )
        .await
    }

    pub async fn run(&self, config: &str, transient: bool) -> Result<DomainInfo, ClientError> {
        self.call(
            Method::POST,
            "/v1/run",
            Some(json!({"config": config, "transient": transient})),
        )
        .await
    }

    pub async fn undefine(
        &self,
        name: &str,
        force: bool,
        snapshots_metadata: bool,
    ) -> Result<Value, ClientError> {
        self.call(
            Method::DELETE,
            &format!(
                "/v1/domains/{}?force={force}&snapshots_metadata={snapshots_metadata}",
                seg(name)
            ),
            None,
        )
        .await
    }

    /// virsh save: the state to `file` (absolute), the domain shut off.
    pub async fn save(&self, name: &str, file: &Path) -> Result<StateInfo, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/domains/{}/save", seg(name)),
            Some(json!({ "file": file })),
        )
        .await
    }

    pub async fn managed_save(&self, name: &str) -> Result<StateInfo, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/domains/{}/managedsave", seg(name)),
            None,
        )
        .await
    }

    /// virsh restore: runs the domain saved in `file` again.
    pub async fn restore(&self, file: &Path) -> Result<DomainInfo, ClientError> {
        self.call(Method::POST, "/v1/restore", Some(json!({ "file": file })))
            .await
    }

    /// Destination side of a migration (the source daemon calls it).
    pub async fn prepare_incoming(
        &self,
        config: &str,
        persistent: bool,
    ) -> Result<Incoming, ClientError> {
        self.call(
            Method::POST,
            "/v1/migrate/incoming",
            Some(json!({"config": config, "persistent": persistent})),
        )
        .await
    }

    /// migrate --live: to the oxvirtd `request.destination` names.
    pub async fn migrate(
        &self,
        name: &str,
        request: &MigrateRequest,
    ) -> Result<StateInfo, ClientError> {
        let body = serde_json::to_value(request).map_err(|e| ClientError::Decode {
            status: 0,
            body: e.to_string(),
        })?;
        self.call(
            Method::POST,
            &format!("/v1/domains/{}/migrate", seg(name)),
            Some(body),
        )
        .await
    }

    pub async fn migrate_parameters(
        &self,
        name: &str,
        change: &MigrateParameters,
    ) -> Result<Value, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/domains/{}/migrate/parameters", seg(name)),
            Some(json!(change)),
        )
        .await
    }

    pub async fn job_info(&self, name: &str) -> Result<Value, ClientError> {
        self.call(Method::GET, &format!("/v1/domains/{}/job", seg(name)), None)
            .await
    }

    pub async fn snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/domains/{}/snapshots", seg(name)),
            None,
        )
        .await
    }

    pub async fn snapshot_create(
        &self,
        name: &str,
        snapshot: &str,
        description: Option<&str>,
    ) -> Result<SnapshotInfo, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/domains/{}/snapshots", seg(name)),
            Some(json!({"name": snapshot, "description": description})),
        )
        .await
    }

    pub async fn snapshot_revert(&self, name: &str, snapshot: &str) -> Result<Value, ClientError> {
        self.call(
            Method::POST,
            &format!(
                "/v1/domains/{}/snapshots/{}/revert",
                seg(name),
                seg(snapshot)
            ),
            None,
        )
        .await
    }

    pub async fn snapshot_delete(&self, name: &str, snapshot: &str) -> Result<Value, ClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/domains/{}/snapshots/{}", seg(name), seg(snapshot)),
            None,
        )
        .await
    }

    pub async fn info(&self, name: &str) -> Result<DomainInfo, ClientError> {
        self.call(Method::GET, &format!("/v1/domains/{}", seg(name)), None)
            .await
    }

    pub async fn state(&self, name: &str) -> Result<StateInfo, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/domains/{}/state", seg(name)),
            None,
        )
        .await
    }

    pub async fn config(&self, name: &str) -> Result<String, ClientError> {
        let v: Value = self
            .call(
                Method::GET,
                &format!("/v1/domains/{}/config", seg(name)),
                None,
            )
            .await?;
        Ok(v.get("config")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned())
    }

    /// start, destroy, reboot, suspend or resume.
    pub async fn action(&self, name: &str, action: &str) -> Result<StateInfo, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/domains/{}/{action}", seg(name)),
            None,
        )
        .await
    }

    pub async fn shutdown(&self, name: &str, timeout: Duration) -> Result<StateInfo, ClientError> {
        let body = json!({"timeout_s": timeout.as_secs()});
        self.call(
            Method::POST,
            &format!("/v1/domains/{}/shutdown", seg(name)),
            Some(body),
        )
        .await
    }

    pub async fn set_autostart(
        &self,
        name: &str,
        enabled: bool,
    ) -> Result<DomainInfo, ClientError> {
        self.call(
            Method::PUT,
            &format!("/v1/domains/{}/autostart", seg(name)),
            Some(json!({"enabled": enabled})),
        )
        .await
    }

    async fn tune<T: DeserializeOwned>(
        &self,
        name: &str,
        what: &str,
        change: Option<&impl Serialize>,
        modify: Modify,
    ) -> Result<T, ClientError> {
        let Some(change) = change else {
            return self
                .call(
                    Method::GET,
                    &format!("/v1/domains/{}/{what}", seg(name)),
                    None,
                )
                .await;
        };
        let path = format!(
            "/v1/domains/{}/{what}?live={}&config={}",
            seg(name),
            modify.live,
            modify.config
        );
        let body = serde_json::to_value(change).map_err(|e| ClientError::Decode {
            status: 0,
            body: e.to_string(),
        })?;
        self.call(Method::PUT, &path, Some(body)).await
    }

    /// Reads (`change` None) or changes the CPU scheduling parameters.
    pub async fn schedinfo(
        &self,
        name: &str,
        change: Option<&SchedInfo>,
        modify: Modify,
    ) -> Result<SchedInfo, ClientError> {
        self.tune(name, "schedinfo", change, modify).await
    }

    pub async fn blkiotune(
        &self,
        name: &str,
        change: Option<&BlkioTune>,
        modify: Modify,
    ) -> Result<BlkioTune, ClientError> {
        self.tune(name, "blkiotune", change, modify).await
    }

    /// Reads (`change` None) or changes one disk's rate limits.
    pub async fn blkdeviotune(
        &self,
        name: &str,
        disk: &str,
        change: Option<&DiskThrottle>,
        modify: Modify,
    ) -> Result<DiskThrottle, ClientError> {
        self.tune(name, &format!("disks/{}/iotune", seg(disk)), change, modify)
            .await
    }

    pub async fn domblkstat(
        &self,
        name: &str,
        disk: Option<&str>,
    ) -> Result<Vec<BlockStats>, ClientError> {
        let query = disk.map_or(String::new(), |d| format!("?disk={}", seg(d)));
        self.call(
            Method::GET,
            &format!("/v1/domains/{}/blockstats{query}", seg(name)),
            None,
        )
        .await
    }

    pub async fn domifstat(
        &self,
        name: &str,
        interface: &str,
    ) -> Result<InterfaceStats, ClientError> {
        self.call(
            Method::GET,
            &format!(
                "/v1/domains/{}/interfaces/{}/stats",
                seg(name),
                seg(interface)
            ),
            None,
        )
        .await
    }

    /// setvcpus, setmem, setmaxmem.
    pub async fn set_sizing(
        &self,
        name: &str,
        change: &Sizing,
        modify: Modify,
    ) -> Result<Sizing, ClientError> {
        self.tune(name, "sizing", Some(change), modify).await
    }

    pub async fn memtune(
        &self,
        name: &str,
        change: Option<&MemTune>,
        modify: Modify,
    ) -> Result<MemTune, ClientError> {
        self.tune(name, "memtune", change, modify).await
    }

    pub async fn vcpupin(
        &self,
        name: &str,
        pin: Option<&VcpuPin>,
        modify: Modify,
    ) -> Result<Vec<VcpuPin>, ClientError> {
        self.tune(name, "vcpupin", pin, modify).await
    }
}

/// Ctrl-]: ends a console session, as in virsh.
pub const CONSOLE_ESCAPE: u8 = 0x1d;

/// How a console session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleEnd {
    /// The user typed the escape character (or the input ended).
    Detached,
    /// The domain's console closed (its VMM ended).
    Closed,
}

impl Client {
    /// A console session on `name`: `input` carries keystrokes (up to
    /// Ctrl-], which detaches), `output` gets what the guest writes.
    pub async fn console(
        &self,
        name: &str,
        mut input: tokio::sync::mpsc::Receiver<Vec<u8>>,
        mut output: impl FnMut(&[u8]),
    ) -> Result<ConsoleEnd, ClientError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let http = |source| self.http_error(source);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(self.connect().await?)
            .await
            .map_err(http)?;
        tokio::spawn(connection.with_upgrades());
        let request = self
            .request(Method::POST)
            .uri(format!("/v1/domains/{}/console", seg(name)))
            .header("connection", "upgrade")
            .header("upgrade", crate::console::PROTOCOL)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Decode {
                status: 0,
                body: e.to_string(),
            })?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        if status != hyper::StatusCode::SWITCHING_PROTOCOLS {
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(http)?
                .to_bytes();
            return Err(match serde_json::from_slice(&bytes) {
                Ok(body) => ClientError::Api(body),
                Err(_) => ClientError::Decode {
                    status: status.as_u16(),
                    body: String::from_utf8_lossy(&bytes).into_owned(),
                },
            });
        }
        let upgraded = hyper::upgrade::on(response).await.map_err(http)?;
        let (mut from_daemon, mut to_daemon) = tokio::io::split(TokioIo::new(upgraded));
        let mut buf = vec![0u8; 4096];
        let io = |source| self.connect_error(source);
        loop {
            tokio::select! {
                keys = input.recv() => {
                    let Some(keys) = keys else {
                        return Ok(ConsoleEnd::Detached);
                    };
                    let escape = keys.iter().position(|&b| b == CONSOLE_ESCAPE);
                    let send = &keys[..escape.unwrap_or(keys.len())];
                    if !send.is_empty() {
                        to_daemon.write_all(send).await.map_err(io)?;
                    }
                    if escape.is_some() {
                        return Ok(ConsoleEnd::Detached);
                    }
                }
                read = from_daemon.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return Ok(ConsoleEnd::Closed),
                    Ok(n) => output(&buf[..n]),
                },
            }
        }
    }
}

/// The name a TLS server's certificate must carry: its host name or IP.
fn rustls_name(
    host: &str,
) -> Result<tokio_rustls::rustls::pki_types::ServerName<'static>, std::io::Error> {
    tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host:?}: {e}"))
    })
}

/// A domain name as one URL path segment (percent-encoded where needed).
pub(crate) fn seg(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Runs one client call to completion on a small runtime of its own (the
/// CLI is not async).
pub fn block_on<F: std::future::Future>(future: F) -> std::io::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(future))
}
