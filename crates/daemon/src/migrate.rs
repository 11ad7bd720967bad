//! migrate --live DOM URI: the guest moves to another oxvirtd. The
//! destination daemon starts a VMM waiting with `--incoming unix:PATH` and
//! answers with that address at once (the VMM takes commands only once the
//! guest has arrived, so the rest of its start runs in the background); the
//! source daemon has its VMM `migrate` there, follows `query-migrate` until
//! it completes, then stops its VMM: here the domain is shut off
//! (migrated). Also migrate-setspeed, migrate-setmaxdowntime, domjobinfo.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::client::Client;
use crate::config::{write_atomic, DomainDef};
use crate::error::ManagerError;
use crate::manager::{Live, Manager, StopRequest};
use crate::vmm_client;

/// How long the destination may take to bind its incoming socket.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a migration may take.
/// One outgoing migration of a domain's VMM, as migrate and save run it.
pub(crate) struct MigrationJob<'a> {
    pub uri: &'a str,
    pub action: &'static str,
    pub stop: StopRequest,
    pub timeout: Duration,
}

const MIGRATE_TIMEOUT: Duration = Duration::from_secs(600);

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
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let socket = self
            .paths()
            .run_dir
            .join(format!("incoming-{name}-{nanos:08x}.sock"));
        let uri = format!("unix:{}", socket.display());
        let (done_tx, mut done) = tokio::sync::oneshot::channel();
        let manager = self.clone();
        let (task_name, task_uri, task_socket) = (name.clone(), uri.clone(), socket.clone());
        tokio::spawn(async move {
            let result = manager.start_from(&task_name, Some(&task_uri)).await;
            crate::manager::remove_if_exists(&task_socket);
            if let Err(e) = &result {
                tracing::warn!(domain = task_name, error = %e, "incoming migration failed");
                manager.forget_incoming(&task_name, persistent);
            }
            // The preparer may have answered already.
            let _ = done_tx.send(result);
        });
        let deadline = Instant::now() + PREPARE_TIMEOUT;
        loop {
            if socket.exists() {
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

    /// Source side: moves the running domain to the oxvirtd at
    /// `destination` (its socket); `persistent` defines it there too.
    pub async fn migrate(
        &self,
        name: &str,
        destination: &Path,
        persistent: bool,
    ) -> Result<(), ManagerError> {
        let live = self.live(name, "migrate")?;
        let config = live.record.def.to_toml()?;
        let remote = Client::new(destination);
        let incoming = remote
            .prepare_incoming(&config, persistent)
            .await
            .map_err(|e| ManagerError::Invalid {
                domain: name.to_owned(),
                field: "destination",
                reason: format!("{}: {e}", destination.display()),
            })?;
        let why = |why: String| ManagerError::Invalid {
            domain: name.to_owned(),
            field: "migrate",
            reason: format!("to {}: {why}; the guest runs on here", incoming.uri),
        };
        let job = MigrationJob {
            uri: &incoming.uri,
            action: "migrate",
            stop: StopRequest::Migrate,
            timeout: MIGRATE_TIMEOUT,
        };
        self.migrate_then_stop(name, &live, job, why).await
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

/// migrate-setspeed / migrate-setmaxdowntime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit_ms: Option<u64>,
}
