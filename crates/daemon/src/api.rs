//! The REST+JSON API on the daemon's unix socket (docs/openapi.yaml).
//! Errors are `{"code", "message", "domain", "field"}` with a matching
//! HTTP status.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::blkio::BlkioTune;
use crate::console::PROTOCOL;
use crate::devices::DiskThrottle;
use crate::domain::State as DomainState;
use crate::error::ManagerError;
use crate::manager::{Manager, StateInfo};
use crate::migrate::{MigrateParameters, MigrateRequest};
use crate::remote::RemoteOrigin;
use crate::settings::{Modify, Sizing, VcpuPin};
use crate::tune::{MemTune, SchedInfo};

/// An error as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) ErrorBody);

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        ApiError::new(
            e.http_status(),
            e.code(),
            e.to_string(),
            e.domain(),
            e.field(),
        )
    }
}

impl ApiError {
    /// The error a module's error enum maps to (its status, code and field).
    pub(crate) fn new(
        status: u16,
        code: &str,
        message: String,
        domain: Option<&str>,
        field: Option<&str>,
    ) -> Self {
        ApiError(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            ErrorBody {
                code: code.to_owned(),
                message,
                domain: domain.map(str::to_owned),
                field: field.map(str::to_owned),
            },
        )
    }

    pub(crate) fn bad_request(message: String, field: Option<&str>) -> Self {
        ApiError::new(400, "bad_request", message, None, field)
    }

    pub(crate) fn internal(message: String) -> Self {
        ApiError::new(500, "internal", message, None, None)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

pub(crate) type ApiResult = Result<Json<Value>, ApiError>;

pub(crate) fn ok(value: impl Serialize) -> ApiResult {
    serde_json::to_value(value)
        .map(Json)
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// Parses a JSON body; an empty body is `{}`.
pub(crate) fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("request body: {e}"), None))
}

/// A boolean query flag: `?all`, `?all=true`, `?all=1`.
pub(crate) fn flag(query: &Option<String>, key: &str) -> Result<bool, ApiError> {
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        if k == key {
            return match v {
                "true" | "1" | "" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(ApiError::bad_request(
                    format!("query parameter {key}={v:?}: expected true or false"),
                    Some(key),
                )),
            };
        }
    }
    Ok(false)
}

pub(crate) fn modify(query: &Option<String>) -> Result<Modify, ApiError> {
    Ok(Modify {
        live: flag(query, "live")?,
        config: flag(query, "config")?,
    })
}

/// The API's routes over `manager`.
pub fn router(manager: Manager) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/domains", get(list).post(define))
        .route("/v1/run", post(run))
        .route("/v1/restore", post(restore))
        .route("/v1/migrate/incoming", post(prepare_incoming))
        .route("/v1/domains/{name}", get(info).delete(undefine))
        .route("/v1/domains/{name}/state", get(state))
        .route("/v1/domains/{name}/config", get(config))
        .route("/v1/domains/{name}/autostart", put(autostart))
        .route(
            "/v1/domains/{name}/schedinfo",
            get(schedinfo).put(set_schedinfo),
        )
        .route("/v1/domains/{name}/memtune", get(memtune).put(set_memtune))
        .route("/v1/domains/{name}/vcpupin", get(vcpupin).put(set_vcpupin))
        .route("/v1/domains/{name}/console", post(console))
        .route("/v1/domains/{name}/sizing", put(set_sizing))
        .route("/v1/domains/{name}/save", post(save))
        .route("/v1/domains/{name}/managedsave", post(managed_save))
        .route("/v1/domains/{name}/migrate", post(migrate))
        .route(
            "/v1/domains/{name}/migrate/parameters",
            put(migrate_parameters),
        )
        .route("/v1/domains/{name}/job", get(job_info))
        .route(
            "/v1/domains/{name}/blkiotune",
            get(blkiotune).put(set_blkiotune),
        )
        .route(
            "/v1/domains/{name}/disks/{disk}/iotune",
            get(blkdeviotune).put(set_blkdeviotune),
        )
        .route("/v1/domains/{name}/blockstats", get(domblkstat))
        .route(
            "/v1/domains/{name}/interfaces/{interface}/stats",
            get(domifstat),
        )
        .route(
            "/v1/domains/{name}/snapshots",
            get(snapshots).post(snapshot_create),
        )
        .route(
            "/v1/domains/{name}/snapshots/{snapshot}",
            axum::routing::delete(snapshot_delete),
        )
        .route(
            "/v1/domains/{name}/snapshots/{snapshot}/revert",
            post(snapshot_revert),
        )
        .route("/v1/domains/{name}/{action}", post(action))
        .merge(crate::net_api::routes())
        .merge(crate::pool_api::routes())
        .merge(crate::disk_attach::routes())
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                ErrorBody {
                    code: "no_such_route".into(),
                    message: "no such API route".into(),
                    domain: None,
                    field: None,
                },
            )
        })
        .with_state(manager)
}

async fn version() -> ApiResult {
    ok(json!({"name": "oxvirtd", "version": env!("CARGO_PKG_VERSION"), "api": "v1"}))
}

async fn list(State(m): State<Manager>, RawQuery(q): RawQuery) -> ApiResult {
    ok(m.list(flag(&q, "all")?))
}

/// `define` and `net-define`: a definition's text and where it came from.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DefineRequest {
    pub(crate) config: String,
    /// The file name the text came from, for error messages.
    #[serde(default)]
    pub(crate) origin: Option<String>,
}

async fn define(
    State(m): State<Manager>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: DefineRequest = body(&bytes)?;
    let name = m
        .define(&req.config, req.origin.as_deref().unwrap_or("definition"))
        .await?;
    Ok((StatusCode::CREATED, ok(m.info(&name)?)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunRequest {
    config: String,
    #[serde(default)]
    transient: bool,
}

async fn run(
    State(m): State<Manager>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: RunRequest = body(&bytes)?;
    Ok((
        StatusCode::CREATED,
        ok(m.run(&req.config, req.transient).await?)?,
    ))
}

async fn info(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    ok(m.info(&name)?)
}

async fn undefine(
    State(m): State<Manager>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    m.undefine(&name, flag(&q, "force")?, flag(&q, "snapshots_metadata")?)
        .await?;
    ok(json!({}))
}

async fn state(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    ok(m.state(&name)?)
}

async fn config(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    ok(json!({"config": m.config_text(&name)?}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AutostartRequest {
    enabled: bool,
}

async fn autostart(State(m): State<Manager>, Path(name): Path<String>, bytes: Bytes) -> ApiResult {
    let req: AutostartRequest = body(&bytes)?;
    m.set_autostart(&name, req.enabled)?;
    ok(m.info(&name)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionRequest {
    /// shutdown: seconds the guest gets to power off before the VMM quits.
    #[serde(default)]
    timeout_s: Option<u64>,
}

async fn action(
    State(m): State<Manager>,
    Path((name, action)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult {
    let req: ActionRequest = body(&bytes)?;
    let gone_as = match action.as_str() {
        "start" => {
            m.start(&name).await?;
            "shutdown"
        }
        "shutdown" => {
            m.shutdown(&name, Duration::from_secs(req.timeout_s.unwrap_or(30)))
                .await?;
            "shutdown"
        }
        "destroy" => {
            m.destroy(&name).await?;
            "destroyed"
        }
        "reboot" => {
            m.reboot(&name).await?;
            "shutdown"
        }
        "suspend" => {
            m.suspend(&name).await?;
            "shutdown"
        }
        "resume" => {
            m.resume(&name).await?;
            "shutdown"
        }
        _ => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                ErrorBody {
                    code: "no_such_action".into(),
                    message: format!(
                        "{action:?}: expected start, shutdown, destroy, reboot, suspend or resume"
                    ),
                    domain: Some(name),
                    field: Some("action".into()),
                },
            ))
        }
    };
    // A transient domain that stopped is gone from the table already.
    match m.state(&name) {
        Ok(state) => ok(state),
        Err(ManagerError::NotFound { .. }) => ok(StateInfo {
            state: DomainState::ShutOff,
            reason: gone_as.to_owned(),
        }),
        Err(e) => Err(e.into()),
    }
}

/// Upgrades the connection to a raw console session (`Upgrade:
/// oxvirt-console`), Docker attach's way.
async fn console(
    State(m): State<Manager>,
    Path(name): Path<String>,
    mut request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let wants_console = request
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(PROTOCOL.as_bytes()));
    if !wants_console {
        return Err(ApiError::bad_request(
            format!("a console needs `Connection: Upgrade` and `Upgrade: {PROTOCOL}`"),
            Some("upgrade"),
        ));
    }
    let attachment = m.console(&name)?;
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => attachment.serve(TokioIo::new(upgraded)).await,
            Err(e) => tracing::warn!(domain = name, error = %e, "console upgrade failed"),
        }
    });
    Ok((
        StatusCode::SWITCHING_PROTOCOLS,
        [(header::CONNECTION, "upgrade"), (header::UPGRADE, PROTOCOL)],
    )
        .into_response())
}

async fn snapshots(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    ok(m.snapshots(&name)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    name: String,
    #[serde(default)]
    description: Option<String>,
}

async fn snapshot_create(
    State(m): State<Manager>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: SnapshotRequest = body(&bytes)?;
    let info = m.snapshot_create(&name, &req.name, req.description).await?;
    Ok((StatusCode::CREATED, ok(info)?))
}

async fn snapshot_revert(
    State(m): State<Manager>,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult {
    m.snapshot_revert(&name, &snapshot).await?;
    ok(json!({}))
}

async fn snapshot_delete(
    State(m): State<Manager>,
    Path((name, snapshot)): Path<(String, String)>,
) -> ApiResult {
    m.snapshot_delete(&name, &snapshot).await?;
    ok(json!({}))
}

async fn blkiotune(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    ok(m.blkiotune(&name, None, Modify::default())?)
}

async fn set_blkiotune(
    State(m): State<Manager>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    bytes: Bytes,
) -> ApiResult {
    let change: BlkioTune = body(&bytes)?;
    ok(m.blkiotune(&name, Some(&change), modify(&q)?)?)
}

async fn blkdeviotune(
    State(m): State<Manager>,
    Path((name, disk)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> ApiResult {
    ok(m.blkdeviotune(&name, &disk, None, modify(&q)?).await?)
}

async fn set_blkdeviotune(
    State(m): State<Manager>,
    Path((name, disk)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    bytes: Bytes,
) -> ApiResult {
    let change: DiskThrottle = body(&bytes)?;
    ok(m.blkdeviotune(&name, &disk, Some(&change), modify(&q)?)
        .await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskQuery {
    #[serde(default)]
    disk: Option<String>,
}

async fn domblkstat(
    State(m): State<Manager>,
    Path(name): Path<String>,
    query: Result<axum::extract::Query<DiskQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let query = query.map_err(|e| ApiError::bad_request(e.body_text(), Some("disk")))?;
    ok(m.domblkstat(&name, query.disk.as_deref()).await?)
}

async fn domifstat(
    State(m): State<Manager>,
    Path((name, interface)): Path<(String, String)>,
) -> ApiResult {
    ok(m.domifstat(&name, &interface).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRequest {
    /// An absolute path on the daemon's host.
    file: std::path::PathBuf,
}

async fn save(State(m): State<Manager>, Path(name): Path<String>, bytes: Bytes) -> ApiResult {
    let req: FileRequest = body(&bytes)?;
    m.save(&name, &req.file).await?;
    ok(m.state(&name)?)
}

async fn managed_save(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    m.managed_save(&name).await?;
    ok(m.state(&name)?)
}

async fn restore(State(m): State<Manager>, bytes: Bytes) -> ApiResult {
    let req: FileRequest = body(&bytes)?;
    let name = m.restore(&req.file).await?;
    ok(m.info(&name)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IncomingRequest {
    config: String,
    #[serde(default)]
    persistent: bool,
}

/// Asked over TCP (`origin`), the VMM waits for the guest on TCP too.
async fn prepare_incoming(
    State(m): State<Manager>,
    origin: Option<axum::Extension<RemoteOrigin>>,
    bytes: Bytes,
) -> ApiResult {
    let req: IncomingRequest = body(&bytes)?;
    let origin = origin.map(|axum::Extension(o)| o);
    ok(m.prepare_incoming(&req.config, req.persistent, origin)
        .await?)
}

async fn migrate(State(m): State<Manager>, Path(name): Path<String>, bytes: Bytes) -> ApiResult {
    let req: MigrateRequest = body(&bytes)?;
    m.migrate(&name, &req).await?;
    // A transient domain is gone from this daemon now.
    match m.state(&name) {
        Ok(state) => ok(state),
        Err(ManagerError::NotFound { .. }) => ok(StateInfo {
            state: DomainState::ShutOff,
            reason: "migrated".to_owned(),
        }),
        Err(e) => Err(e.into()),
    }
}

async fn migrate_parameters(
    State(m): State<Manager>,
    Path(name): Path<String>,
    bytes: Bytes,
) -> ApiResult {
    let change: MigrateParameters = body(&bytes)?;
    ok(m.migrate_parameters(&name, &change).await?)
}

async fn job_info(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    ok(m.job_info(&name).await?)
}

async fn set_sizing(
    State(m): State<Manager>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    bytes: Bytes,
) -> ApiResult {
    let change: Sizing = body(&bytes)?;
    ok(m.set_sizing(&name, &change, modify(&q)?)?)
}

async fn schedinfo(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    ok(m.schedinfo(&name)?)
}

async fn set_schedinfo(
    State(m): State<Manager>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    bytes: Bytes,
) -> ApiResult {
    let change: SchedInfo = body(&bytes)?;
    ok(m.set_schedinfo(&name, &change, modify(&q)?)?)
}

async fn memtune(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    ok(m.memtune(&name)?)
}

async fn set_memtune(
    State(m): State<Manager>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    bytes: Bytes,
) -> ApiResult {
    let change: MemTune = body(&bytes)?;
    ok(m.set_memtune(&name, &change, modify(&q)?)?)
}

async fn vcpupin(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    ok(m.vcpupin(&name)?)
}

async fn set_vcpupin(
    State(m): State<Manager>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    bytes: Bytes,
) -> ApiResult {
    let pin: VcpuPin = body(&bytes)?;
    ok(m.set_vcpupin(&name, &pin, modify(&q)?)?)
}
