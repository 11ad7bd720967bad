//! The `net-*` verbs on the API (docs/openapi.yaml, `/v1/networks`) and
//! their client calls. Network changes run `ip` and `nft`, so each runs on
//! a blocking thread.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hyper::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{body, flag, ok, ApiError, ApiResult, DefineRequest};
use crate::client::{Client, ClientError};
use crate::devices::nic_id;
use crate::manager::Manager;
use crate::network::{
    InterfaceAddresses, LeaseInfo, NetworkError, NetworkInfo, NetworkSummary, Networks,
    DEFAULT_NETWORK,
};

impl From<NetworkError> for ApiError {
    fn from(e: NetworkError) -> Self {
        ApiError::new(e.http_status(), e.code(), e.to_string(), None, e.field())
    }
}

/// The `/v1/networks` routes.
pub(crate) fn routes() -> Router<Manager> {
    Router::new()
        .route("/v1/networks", get(list).post(define))
        .route("/v1/networks/{name}", get(info).delete(undefine))
        .route("/v1/networks/{name}/config", get(config))
        .route("/v1/networks/{name}/start", post(start))
        .route("/v1/networks/{name}/destroy", post(destroy))
        .route("/v1/networks/{name}/autostart", put(autostart))
        .route("/v1/networks/{name}/leases", get(leases))
        .route("/v1/domains/{name}/interfaces/addresses", get(domifaddr))
}

/// Runs `f` on the daemon's networks on a blocking thread.
async fn blocking<T: serde::Serialize + Send + 'static>(
    m: Manager,
    f: impl FnOnce(&Networks) -> Result<T, NetworkError> + Send + 'static,
) -> ApiResult {
    let result = tokio::task::spawn_blocking(move || f(&m.0.networks))
        .await
        .map_err(|e| ApiError::internal(format!("network task: {e}")))?;
    ok(result?)
}

async fn list(State(m): State<Manager>, RawQuery(q): RawQuery) -> ApiResult {
    let all = flag(&q, "all")?;
    blocking(m, move |n| n.list(all)).await
}

async fn define(
    State(m): State<Manager>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: DefineRequest = body(&bytes)?;
    let origin = req.origin.unwrap_or_else(|| "definition".into());
    let info = blocking(m, move |n| n.define(&req.config, &origin)).await?;
    Ok((StatusCode::CREATED, info))
}

async fn info(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    blocking(m, move |n| n.info(&name)).await
}

async fn undefine(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    blocking(m, move |n| n.undefine(&name).map(|()| json!({}))).await
}

async fn config(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    blocking(m, move |n| {
        n.config_text(&name).map(|c| json!({ "config": c }))
    })
    .await
}

async fn start(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    blocking(m, move |n| n.start(&name)).await
}

async fn destroy(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    blocking(m, move |n| n.destroy(&name)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AutostartRequest {
    enabled: bool,
}

async fn autostart(State(m): State<Manager>, Path(name): Path<String>, bytes: Bytes) -> ApiResult {
    let req: AutostartRequest = body(&bytes)?;
    blocking(m, move |n| n.set_autostart(&name, req.enabled)).await
}

async fn leases(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    blocking(m, move |n| n.leases(&name)).await
}

/// The domain's NICs with the addresses their networks leased them.
async fn domifaddr(State(m): State<Manager>, Path(name): Path<String>) -> ApiResult {
    let (def, taps) = m.with(&name, |d| {
        let live = d.live.as_ref();
        let def = live.map_or(&d.def, |l| &l.record.def).clone();
        Ok((def, live.map(|l| l.record.taps.clone()).unwrap_or_default()))
    })?;
    blocking(m, move |n| {
        let mut nics = Vec::with_capacity(def.nics.len());
        for (i, nic) in def.nics.iter().enumerate() {
            let network = nic
                .network
                .clone()
                .unwrap_or_else(|| DEFAULT_NETWORK.into());
            let mac = nic.mac_for(&def.name, i);
            let addresses = n
                .leases(&network)?
                .into_iter()
                .filter(|l| l.mac.eq_ignore_ascii_case(&mac))
                .map(|l| l.ip)
                .collect();
            nics.push(InterfaceAddresses {
                name: taps.get(i).cloned().unwrap_or_else(|| nic_id(i)),
                mac,
                network,
                addresses,
            });
        }
        Ok(nics)
    })
    .await
}

/// The network verbs' calls.
impl Client {
    pub async fn net_list(&self, all: bool) -> Result<Vec<NetworkSummary>, ClientError> {
        self.call(Method::GET, &format!("/v1/networks?all={all}"), None)
            .await
    }

    pub async fn net_info(&self, name: &str) -> Result<NetworkInfo, ClientError> {
        self.call(Method::GET, &net_path(name, ""), None).await
    }

    pub async fn net_config(&self, name: &str) -> Result<String, ClientError> {
        let v: Value = self
            .call(Method::GET, &net_path(name, "/config"), None)
            .await?;
        Ok(v["config"].as_str().unwrap_or_default().to_owned())
    }

    pub async fn net_define(&self, config: &str, origin: &str) -> Result<NetworkInfo, ClientError> {
        let body = json!({ "config": config, "origin": origin });
        self.call(Method::POST, "/v1/networks", Some(body)).await
    }

    pub async fn net_undefine(&self, name: &str) -> Result<Value, ClientError> {
        self.call(Method::DELETE, &net_path(name, ""), None).await
    }

    pub async fn net_start(&self, name: &str) -> Result<NetworkInfo, ClientError> {
        self.call(Method::POST, &net_path(name, "/start"), None)
            .await
    }

    pub async fn net_destroy(&self, name: &str) -> Result<NetworkInfo, ClientError> {
        self.call(Method::POST, &net_path(name, "/destroy"), None)
            .await
    }

    pub async fn net_autostart(
        &self,
        name: &str,
        enabled: bool,
    ) -> Result<NetworkInfo, ClientError> {
        let body = json!({ "enabled": enabled });
        self.call(Method::PUT, &net_path(name, "/autostart"), Some(body))
            .await
    }

    pub async fn net_leases(&self, name: &str) -> Result<Vec<LeaseInfo>, ClientError> {
        self.call(Method::GET, &net_path(name, "/leases"), None)
            .await
    }

    pub async fn domifaddr(&self, domain: &str) -> Result<Vec<InterfaceAddresses>, ClientError> {
        let path = format!(
            "/v1/domains/{}/interfaces/addresses",
            crate::client::seg(domain)
        );
        self.call(Method::GET, &path, None).await
    }
}

/// `/v1/networks/NAME...`.
fn net_path(name: &str, rest: &str) -> String {
    format!("/v1/networks/{}{rest}", crate::client::seg(name))
}
