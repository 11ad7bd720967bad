//! migrate --live DOM URI: the guest moves to another oxvirtd, on this
//! host (its unix socket) or another (its remote API, `oxvirt+tcp://`).
//! The destination daemon starts a VMM waiting with `--incoming unix:PATH`
//! (`tcp:ADDR:PORT` when asked over TCP) and answers with that address as
//! soon as the VMM listens (it takes commands only once the guest has
//! arrived, so the rest of its start runs in the background); the source
//! daemon has its VMM `migrate` there, follows `query-migrate` until it
//! completes, then stops its VMM: here the domain is shut off (migrated).
//! Also migrate-setspeed, migrate-setmaxdowntime, domjobinfo.

use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::client::Client;
use crate::config::{write_atomic, DomainDef};
use crate::error::ManagerError;
use crate::manager::{Live, Manager, StopRequest};
use crate::remote::{ConnectUri, RemoteOrigin, Token};
use crate::vmm_client;

/// How long the destination may take to bind its incoming socket.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a migration may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(600);

/// One outgoing migration of a domain's VMM, as migrate and save run it.
pub(crate) struct MigrationJob<'a> {
    pub uri: &'a str,
    pub action: &'static str,
    pub stop: StopRequest,
    pub timeout: Duration,
}

/// `migrate --live [--persistent] [--undefinesource] DOM DESTURI`, as the
/// API takes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination daemon: a socket path, `oxvirt:///system`, or
    /// `oxvirt+tcp://HOST:PORT/system`.
    pub destination: String,
    /// The token of a TCP destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_token: Option<String>,
    /// The CA certificate(s) (PEM) a TLS destination is checked against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_ca: Option<String>,
    /// Define the domain at the destination too.
    #[serde(default)]
    pub persistent: bool,
    /// Undefine it here once it runs there.
    #[serde(default)]
    pub undefine_source: bool,
}

/// The destination's answer: where the source's VMM sends the guest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Incoming {
    pub uri: String,
}

impl Manager {
    /// Destination side: takes the domain defined by `config` and starts a
    /// VMM waiting for it; returns the address to migrate to.
    pub async fn prepare_incoming(
        &self,
        config: &str,
        persistent: bool,
        origin: Option<RemoteOrigin>,
    ) -> Result<Incoming, ManagerError> {
        let def = DomainDef::parse(config, "migration")?;
        def.validate()?;
        let name = def.name.clone();
        {
            let _guard = self.lifecycle().await;
            if self.with(&name, |_| Ok(())).is_ok() {
                return Err(ManagerError::Exists { domain: name });
            }
            if persistent {
                write_atomic(&self.paths().definition(&name), config.as_bytes())?;
                self.insert_defined(def);
            } else {
                self.insert_transient(def);
            }
        }
        let listener = match origin {
            Some(o) => IncomingListener::tcp(&name, o.listen_ip)?,
            None => IncomingListener::unix(self.paths().run_dir.join(format!(
                "incoming-{name}-{:08x}.sock",
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos())
            ))),
        };
        let uri = listener.uri();
        let (done_tx, mut done) = tokio::sync::oneshot::channel();
        let manager = self.clone();
        let (task_name, task_uri, task_listener) = (name.clone(), uri.clone(), listener.clone());
        tokio::spawn(async move {
            let result = manager.start_from(&task_name, Some(&task_uri)).await;
            task_listener.remove();
            if let Err(e) = &result {
                tracing::warn!(domain = task_name, error = %e, "incoming migration failed");
                manager.forget_incoming(&task_name, persistent);
            }
            // The preparer may have answered already.
            let _ = done_tx.send(result);
        });
        let deadline = Instant::now() + PREPARE_TIMEOUT;
        loop {
            if listener.is_listening() {
                return Ok(Incoming { uri });
            }
            if let Ok(result) = done.try_recv() {
                result?;
                return Err(ManagerError::StartFailed {
                    domain: name,
                    detail: "the VMM ended before the guest arrived".into(),
                });
            }
            if Instant::now() > deadline {
                return Err(ManagerError::Timeout {
                    domain: name,
                    action: "prepare an incoming migration",
                    timeout: PREPARE_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Source side: moves the running domain to the oxvirtd that
    /// `request.destination` names. On any failure the guest runs on here.
    pub async fn migrate(&self, name: &str, request: &MigrateRequest) -> Result<(), ManagerError> {
        let invalid = |field, reason| ManagerError::Invalid {
            domain: name.to_owned(),
            field,
            reason,
        };
        let destination = ConnectUri::parse(&request.destination)
            .map_err(|e| invalid("destination", e.to_string()))?;
        let token = request
            .destination_token
            .as_deref()
            .map(Token::from_text)
            .transpose()
            .map_err(|e| invalid("destination_token", e))?;
        let live = self.live(name, "migrate")?;
        let persistent = self.with(name, |d| Ok(d.persistent))?;
        if request.undefine_source && persistent && self.has_snapshots(name) {
            return Err(invalid(
                "undefine_source",
                "it has snapshots, which stay with this host: delete them first, or migrate without --undefinesource".into(),
            ));
        }
        let config = live.record.def.to_toml()?;
        let mut remote = Client::for_uri(destination.clone(), token);
        if let Some(pem) = &request.destination_ca {
            remote = remote
                .with_ca_pem(pem.as_bytes(), Path::new("destination_ca"))
                .map_err(|e| invalid("destination_ca", e.to_string()))?;
        }
        let incoming = remote
            .prepare_incoming(&config, request.persistent)
            .await
            .map_err(|e| invalid("destination", format!("{destination}: {e}")))?;
        let uri = reachable_uri(&incoming.uri, &destination);
        let why = |why: String| ManagerError::Invalid {
            domain: name.to_owned(),
            field: "migrate",
            reason: format!("to {uri}: {why}; the guest runs on here"),
        };
        let job = MigrationJob {
            uri: &uri,
            action: "migrate",
            stop: StopRequest::Migrate,
            timeout: MIGRATE_TIMEOUT,
        };
        self.migrate_then_stop(name, &live, job, why).await?;
        if request.undefine_source && persistent {
            self.undefine(name, false, false).await?;
        }
        Ok(())
    }

    /// Runs the VMM's `migrate` to `job.uri` and waits for it; once it
    /// completed, stops the VMM (the guest now lives in the stream's
    /// target). A failed or cancelled migration gives `failed(why)`; one
    /// past the timeout is cancelled. Either way the guest runs on here.
    pub(crate) async fn migrate_then_stop(
        &self,
        name: &str,
        live: &Live,
        job: MigrationJob<'_>,
        failed: impl FnOnce(String) -> ManagerError,
    ) -> Result<(), ManagerError> {
        let vmm = |source| ManagerError::Vmm {
            domain: name.to_owned(),
            source,
        };
        vmm_client::execute_with(&live.api, "migrate", Some(json!({ "uri": job.uri })))
            .await
            .map_err(vmm)?;
        let deadline = Instant::now() + job.timeout;
        loop {
            let info = vmm_client::execute(&live.api, "query-migrate")
                .await
                .map_err(vmm)?;
            match info.get("status").and_then(Value::as_str) {
                Some("completed") => break,
                Some(status @ ("failed" | "cancelled")) => {
                    let why = info.get("error-desc").and_then(Value::as_str);
                    return Err(failed(why.unwrap_or(status).to_owned()));
                }
                _ if Instant::now() > deadline => {
                    // Best effort: the guest then runs on here.
                    let _ = vmm_client::execute(&live.api, "migrate_cancel").await;
                    return Err(ManagerError::Timeout {
                        domain: name.to_owned(),
                        action: job.action,
                        timeout: job.timeout,
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let live = self.request_stop(name, job.stop, job.action)?;
        if let Err(source) = vmm_client::execute(&live.api, "quit").await {
            tracing::warn!(domain = name, error = %source, "quit after {} failed; killing", job.action);
            crate::supervise::kill(&live);
        }
        self.expect_exit(name, live.record.pid, job.action).await
    }

    /// migrate-setspeed (MiB/s) and migrate-setmaxdowntime (ms), passed to
    /// the VMM's migrate-set-parameters.
    pub async fn migrate_parameters(
        &self,
        name: &str,
        change: &MigrateParameters,
    ) -> Result<Value, ManagerError> {
        let live = self.live(name, "tune migration")?;
        let vmm = |source| ManagerError::Vmm {
            domain: name.to_owned(),
            source,
        };
        let mut args = json!({});
        if let Some(mib) = change.max_bandwidth_mib {
            args["max-bandwidth"] = json!(mib.saturating_mul(1 << 20));
        }
        if let Some(ms) = change.downtime_limit_ms {
            args["downtime-limit"] = json!(ms);
        }
        vmm_client::execute_with(&live.api, "migrate-set-parameters", Some(args))
            .await
            .map_err(vmm)?;
        vmm_client::execute(&live.api, "query-migrate-parameters")
            .await
            .map_err(vmm)
    }

    /// domjobinfo: the VMM's `query-migrate` (save and migrate jobs).
    pub async fn job_info(&self, name: &str) -> Result<Value, ManagerError> {
        let live = self.live(name, "show a job")?;
        vmm_client::execute(&live.api, "query-migrate")
            .await
            .map_err(|source| ManagerError::Vmm {
                domain: name.to_owned(),
                source,
            })
    }
}

/// The address the source's VMM sends the guest to: a destination that
/// listens on TCP names its own bind address, which may be a wildcard, so
/// the host comes from the URI the source reached its daemon by.
fn reachable_uri(incoming: &str, destination: &ConnectUri) -> String {
    let port = incoming
        .strip_prefix("tcp:")
        .and_then(|rest| rest.rsplit_once(':'))
        .map(|(_, port)| port);
    match (port, destination.remote()) {
        (Some(port), Some((host, _))) if host.contains(':') => format!("tcp:[{host}]:{port}"),
        (Some(port), Some((host, _))) => format!("tcp:{host}:{port}"),
        _ => incoming.to_owned(),
    }
}

/// Where a destination VMM waits for the guest.
#[derive(Debug, Clone)]
enum IncomingListener {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl IncomingListener {
    fn unix(socket: PathBuf) -> Self {
        Self::Unix(socket)
    }

    /// A free port on `ip`: the daemon binds port 0 and lets it go for the
    /// VMM (another process taking it in between fails the migration, and
    /// the guest runs on at the source).
    fn tcp(domain: &str, ip: IpAddr) -> Result<Self, ManagerError> {
        let addr = TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .map_err(|source| ManagerError::Io {
                path: PathBuf::from(format!(
                    "tcp port for the incoming migration of {domain:?} on {ip}"
                )),
                source,
            })?;
        Ok(Self::Tcp(addr))
    }

    fn uri(&self) -> String {
        match self {
            Self::Unix(socket) => format!("unix:{}", socket.display()),
            Self::Tcp(addr) if addr.is_ipv6() => format!("tcp:[{}]:{}", addr.ip(), addr.port()),
            Self::Tcp(addr) => format!("tcp:{}:{}", addr.ip(), addr.port()),
        }
    }

    fn is_listening(&self) -> bool {
        match self {
            Self::Unix(socket) => socket.exists(),
            Self::Tcp(addr) => tcp_listening(addr.port()),
        }
    }

    fn remove(&self) {
        if let Self::Unix(socket) = self {
            crate::manager::remove_if_exists(socket);
        }
    }
}

/// Whether a socket in this network namespace listens on `port`
/// (`/proc/net/tcp*`: state 0A). Connecting to find out would be taken
/// for the source.
fn tcp_listening(port: u16) -> bool {
    let wanted = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let mut fields = line.split_whitespace();
                let local = fields.nth(1).unwrap_or("");
                let state = fields.nth(1).unwrap_or("");
                local.ends_with(&wanted) && state == "0A"
            })
        })
    })
}

/// migrate-setspeed / migrate-setmaxdowntime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_destination_is_reached_by_the_uri_host() {
        let dest = ConnectUri::Tcp {
            host: "10.0.0.2".into(),
            port: 16509,
        };
        assert_eq!(
            reachable_uri("tcp:0.0.0.0:4444", &dest),
            "tcp:10.0.0.2:4444"
        );
        let v6 = ConnectUri::Tcp {
            host: "fd00::2".into(),
            port: 1,
        };
        assert_eq!(reachable_uri("tcp:[::]:4444", &v6), "tcp:[fd00::2]:4444");
        let local = ConnectUri::Unix("/run/x.sock".into());
        assert_eq!(
            reachable_uri("unix:/run/in.sock", &local),
            "unix:/run/in.sock"
        );
    }

    #[test]
    fn a_bound_port_shows_as_listening() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(tcp_listening(port));
        drop(listener);
        assert!(!tcp_listening(port));
    }
}
