//! The `pool-*` and `vol-*` verbs on the API (docs/openapi.yaml,
//! `/v1/pools`, `/v1/volumes`) and their client calls. Volume work is file
//! I/O (a clone copies a whole image), so each runs on a blocking thread.

use axum::body::Bytes;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hyper::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{body, flag, ok, ApiError, ApiResult, DefineRequest};
use crate::client::{seg, Client, ClientError};
use crate::manager::Manager;
use crate::pool::{DiskUser, PoolError, PoolInfo, Pools, ResizeRequest, VolumeInfo, VolumeRequest};

impl From<PoolError> for ApiError {
    fn from(e: PoolError) -> Self {
        ApiError::new(e.http_status(), e.code(), e.to_string(), None, e.field())
    }
}

/// The `/v1/pools` and `/v1/volumes` routes.
pub(crate) fn routes() -> Router<Manager> {
    Router::new()
        .route("/v1/pools", get(list).post(define))
        .route("/v1/pools/{pool}", get(info).delete(undefine))
        .route("/v1/pools/{pool}/config", get(config))
        .route("/v1/pools/{pool}/build", post(build))
        .route("/v1/pools/{pool}/start", post(start))
        .route("/v1/pools/{pool}/destroy", post(destroy))
        .route("/v1/pools/{pool}/refresh", post(refresh))
        .route("/v1/pools/{pool}/delete", post(delete))
        .route("/v1/pools/{pool}/autostart", put(autostart))
        .route("/v1/pools/{pool}/volumes", get(volumes).post(create_volume))
        .route(
            "/v1/pools/{pool}/volumes/{volume}",
            get(volume).delete(delete_volume),
        )
        .route(
            "/v1/pools/{pool}/volumes/{volume}/capacity",
            put(resize_volume),
        )
        .route(
            "/v1/pools/{pool}/volumes/{volume}/clone",
            post(clone_volume),
        )
        .route("/v1/volumes", get(volume_by_path))
}

impl Manager {
    /// The daemon's storage pools (what the pool and volume verbs call).
    pub fn pools(&self) -> &Pools {
        &self.0.pools
    }

    /// Every image a domain's disks use, for the volume verbs' checks.
    pub fn disk_users(&self) -> Vec<DiskUser> {
        let table = self.table();
        let mut users = Vec::new();
        for (name, d) in table.iter() {
            let running = d.live.is_some();
            let live = d.live.iter().flat_map(|l| l.record.def.disks.iter());
            users.extend(d.def.disks.iter().chain(live).map(|disk| DiskUser {
                domain: name.clone(),
                path: disk.path.clone(),
                running,
            }));
        }
        users
    }
}

/// Runs `f` on the daemon's pools on a blocking thread.
async fn blocking<T: serde::Serialize + Send + 'static>(
    m: Manager,
    f: impl FnOnce(&Manager, &Pools) -> Result<T, PoolError> + Send + 'static,
) -> ApiResult {
    let result = tokio::task::spawn_blocking(move || f(&m, &m.0.pools))
        .await
        .map_err(|e| ApiError::internal(format!("storage pool task: {e}")))?;
    ok(result?)
}

async fn list(State(m): State<Manager>, RawQuery(q): RawQuery) -> ApiResult {
    let all = flag(&q, "all")?;
    blocking(m, move |_, p| Ok(p.list(all))).await
}

async fn define(
    State(m): State<Manager>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: DefineRequest = body(&bytes)?;
    let origin = req.origin.unwrap_or_else(|| "definition".into());
    let info = blocking(m, move |_, p| p.define(&req.config, &origin)).await?;
    Ok((StatusCode::CREATED, info))
}

async fn info(State(m): State<Manager>, Path(pool): Path<String>) -> ApiResult {
    blocking(m, move |_, p| p.info(&pool)).await
}

async fn undefine(State(m): State<Manager>, Path(pool): Path<String>) -> ApiResult {
    blocking(m, move |_, p| p.undefine(&pool).map(|()| json!({}))).await
}

async fn config(State(m): State<Manager>, Path(pool): Path<String>) -> ApiResult {
    blocking(m, move |_, p| {
        p.config_text(&pool).map(|c| json!({ "config": c }))
    })
    .await
}

async fn build(State(m): State<Manager>, Path(pool): Path<String>) -> ApiResult {
    blocking(m, move |_, p| p.build(&pool)).await
}

async fn start(State(m): State<Manager>, Path(pool): Path<String>) -> ApiResult {
    blocking(m, move |_, p| p.start(&pool)).await
}

async fn destroy(State(m): State<Manager>, Path(pool): Path<String>) -> ApiResult {
    blocking(m, move |_, p| p.destroy(&pool)).await
}

async fn refresh(State(m): State<Manager>, Path(pool): Path<String>) -> ApiResult {
    blocking(m, move |_, p| p.refresh(&pool)).await
}

async fn delete(State(m): State<Manager>, Path(pool): Path<String>) -> ApiResult {
    blocking(m, move |_, p| p.delete(&pool).map(|()| json!({}))).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AutostartRequest {
    enabled: bool,
}

async fn autostart(State(m): State<Manager>, Path(pool): Path<String>, bytes: Bytes) -> ApiResult {
    let req: AutostartRequest = body(&bytes)?;
    blocking(m, move |_, p| p.set_autostart(&pool, req.enabled)).await
}

async fn volumes(State(m): State<Manager>, Path(pool): Path<String>) -> ApiResult {
    blocking(m, move |_, p| p.volumes(&pool)).await
}

async fn create_volume(
    State(m): State<Manager>,
    Path(pool): Path<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: VolumeRequest = body(&bytes)?;
    let info = blocking(m, move |_, p| p.create_volume(&pool, &req)).await?;
    Ok((StatusCode::CREATED, info))
}

async fn volume(
    State(m): State<Manager>,
    Path((pool, volume)): Path<(String, String)>,
) -> ApiResult {
    blocking(m, move |_, p| p.volume(&pool, &volume)).await
}

/// The checks against domains' disks hold the lifecycle lock, so no
/// define or start slips in between the check and the change.
async fn delete_volume(
    State(m): State<Manager>,
    Path((pool, volume)): Path<(String, String)>,
) -> ApiResult {
    let _guard = m.lifecycle().await;
    blocking(m.clone(), move |m, p| {
        p.delete_volume(&pool, &volume, &m.disk_users())
            .map(|()| json!({}))
    })
    .await
}

async fn resize_volume(
    State(m): State<Manager>,
    Path((pool, volume)): Path<(String, String)>,
    bytes: Bytes,
) -> ApiResult {
    let req: ResizeRequest = body(&bytes)?;
    let _guard = m.lifecycle().await;
    blocking(m.clone(), move |m, p| {
        p.resize_volume(&pool, &volume, &req, &m.disk_users())
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CloneRequest {
    name: String,
}

async fn clone_volume(
    State(m): State<Manager>,
    Path((pool, volume)): Path<(String, String)>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: CloneRequest = body(&bytes)?;
    let _guard = m.lifecycle().await;
    let info = blocking(m.clone(), move |m, p| {
        p.clone_volume(&pool, &volume, &req.name, &m.disk_users())
    })
    .await?;
    Ok((StatusCode::CREATED, info))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathQuery {
    path: std::path::PathBuf,
}

async fn volume_by_path(
    State(m): State<Manager>,
    query: Result<Query<PathQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text(), Some("path")))?;
    blocking(m, move |_, p| p.volume_by_path(&q.path)).await
}

/// The storage verbs' calls.
impl Client {
    pub async fn pool_list(&self, all: bool) -> Result<Vec<PoolInfo>, ClientError> {
        self.call(Method::GET, &format!("/v1/pools?all={all}"), None)
            .await
    }

    pub async fn pool_info(&self, pool: &str) -> Result<PoolInfo, ClientError> {
        self.call(Method::GET, &pool_path(pool, ""), None).await
    }

    pub async fn pool_config(&self, pool: &str) -> Result<String, ClientError> {
        let v: Value = self
            .call(Method::GET, &pool_path(pool, "/config"), None)
            .await?;
        Ok(v["config"].as_str().unwrap_or_default().to_owned())
    }

    pub async fn pool_define(&self, config: &str, origin: &str) -> Result<PoolInfo, ClientError> {
        let body = json!({ "config": config, "origin": origin });
        self.call(Method::POST, "/v1/pools", Some(body)).await
    }

    pub async fn pool_undefine(&self, pool: &str) -> Result<Value, ClientError> {
        self.call(Method::DELETE, &pool_path(pool, ""), None).await
    }

    /// build, start, destroy or refresh.
    pub async fn pool_action(&self, pool: &str, action: &str) -> Result<PoolInfo, ClientError> {
        self.call(Method::POST, &pool_path(pool, &format!("/{action}")), None)
            .await
    }

    /// pool-delete: removes the inactive pool's empty folder.
    pub async fn pool_delete(&self, pool: &str) -> Result<Value, ClientError> {
        self.call(Method::POST, &pool_path(pool, "/delete"), None)
            .await
    }

    pub async fn pool_autostart(&self, pool: &str, enabled: bool) -> Result<PoolInfo, ClientError> {
        let body = json!({ "enabled": enabled });
        self.call(Method::PUT, &pool_path(pool, "/autostart"), Some(body))
            .await
    }

    pub async fn vol_list(&self, pool: &str) -> Result<Vec<VolumeInfo>, ClientError> {
        self.call(Method::GET, &pool_path(pool, "/volumes"), None)
            .await
    }

    pub async fn vol_info(&self, pool: &str, volume: &str) -> Result<VolumeInfo, ClientError> {
        self.call(Method::GET, &vol_path(pool, volume, ""), None)
            .await
    }

    /// The volume at `path`, in whichever active pool holds it.
    pub async fn vol_by_path(&self, path: &str) -> Result<VolumeInfo, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/volumes?path={}", seg(path)),
            None,
        )
        .await
    }

    pub async fn vol_create(
        &self,
        pool: &str,
        request: &VolumeRequest,
    ) -> Result<VolumeInfo, ClientError> {
        let body = serde_json::to_value(request).map_err(|e| ClientError::Decode {
            status: 0,
            body: e.to_string(),
        })?;
        self.call(Method::POST, &pool_path(pool, "/volumes"), Some(body))
            .await
    }

    pub async fn vol_delete(&self, pool: &str, volume: &str) -> Result<Value, ClientError> {
        self.call(Method::DELETE, &vol_path(pool, volume, ""), None)
            .await
    }

    pub async fn vol_resize(
        &self,
        pool: &str,
        volume: &str,
        request: &ResizeRequest,
    ) -> Result<VolumeInfo, ClientError> {
        let body = serde_json::to_value(request).map_err(|e| ClientError::Decode {
            status: 0,
            body: e.to_string(),
        })?;
        self.call(
            Method::PUT,
            &vol_path(pool, volume, "/capacity"),
            Some(body),
        )
        .await
    }

    pub async fn vol_clone(
        &self,
        pool: &str,
        volume: &str,
        new_name: &str,
    ) -> Result<VolumeInfo, ClientError> {
        let body = json!({ "name": new_name });
        self.call(Method::POST, &vol_path(pool, volume, "/clone"), Some(body))
            .await
    }
}

/// `/v1/pools/POOL...`.
fn pool_path(pool: &str, rest: &str) -> String {
    format!("/v1/pools/{}{rest}", seg(pool))
}

/// `/v1/pools/POOL/volumes/VOLUME...`.
fn vol_path(pool: &str, volume: &str, rest: &str) -> String {
    format!("/v1/pools/{}/volumes/{}{rest}", seg(pool), seg(volume))
}
