//! A client for one VMM's control socket (JSON lines, QMP's shape): one
//! connection per command, events on the way are skipped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Errors talking to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmClientError {
    #[error("VMM control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("VMM control socket {path}: no answer to {command} within {timeout:?}")]
    Timeout {
        path: PathBuf,
        command: String,
        timeout: Duration,
    },
    #[error("VMM control socket {path}: {command}: {class}: {desc}")]
    Command {
        path: PathBuf,
        command: String,
        class: String,
        desc: String,
    },
    #[error("VMM control socket {path}: unexpected reply to {command}: {reply}")]
    Protocol {
        path: PathBuf,
        command: String,
        reply: String,
    },
}

const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `command` and returns its `return` value.
pub async fn execute(socket: &Path, command: &str) -> Result<Value, VmmClientError> {
    execute_with(socket, command, None).await
}

/// Sends `command` with `arguments` and returns its `return` value.
pub async fn execute_with(
    socket: &Path,
    command: &str,
    arguments: Option<Value>,
) -> Result<Value, VmmClientError> {
    match tokio::time::timeout(TIMEOUT, exchange(socket, command, arguments)).await {
        Ok(result) => result,
        Err(_) => Err(VmmClientError::Timeout {
            path: socket.to_owned(),
            command: command.to_owned(),
            timeout: TIMEOUT,
        }),
    }
}

async fn exchange(
    socket: &Path,
    command: &str,
    arguments: Option<Value>,
) -> Result<Value, VmmClientError> {
    let io = |source| VmmClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let stream = UnixStream::connect(socket).await.map_err(io)?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut request = json!({"execute": command, "id": 1});
    if let Some(arguments) = arguments {
        request["arguments"] = arguments;
    }
    let request = request.to_string() + "\n";
    write.write_all(request.as_bytes()).await.map_err(io)?;
    let protocol = |reply: &str| VmmClientError::Protocol {
        path: socket.to_owned(),
        command: command.to_owned(),
        reply: reply.to_owned(),
    };
    loop {
        let Some(line) = lines.next_line().await.map_err(io)? else {
            return Err(protocol("connection closed"));
        };
        let reply: Value = serde_json::from_str(&line).map_err(|_| protocol(&line))?;
        if reply.get("QMP").is_some() || reply.get("event").is_some() {
            continue;
        }
        if let Some(value) = reply.get("return") {
            return Ok(value.clone());
        }
        if let Some(error) = reply.get("error") {
            let text = |key| {
                error
                    .get(key)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            return Err(VmmClientError::Command {
                path: socket.to_owned(),
                command: command.to_owned(),
                class: text("class"),
                desc: text("desc"),
            });
        }
        return Err(protocol(&line));
    }
}

/// The VMM's run state: "running", "paused" or "shutdown".
pub async fn query_status(socket: &Path) -> Result<String, VmmClientError> {
    let value = execute(socket, "query-status").await?;
    value
        .get("status")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| VmmClientError::Protocol {
            path: socket.to_owned(),
            command: "query-status".into(),
            reply: value.to_string(),
        })
}

/// The thread id of each vCPU, in vCPU order.
pub async fn vcpu_threads(socket: &Path) -> Result<Vec<u32>, VmmClientError> {
    let value = execute(socket, "query-cpus").await?;
    let protocol = || VmmClientError::Protocol {
        path: socket.to_owned(),
        command: "query-cpus".into(),
        reply: value.to_string(),
    };
    let cpus = value.as_array().ok_or_else(protocol)?;
    let mut tids = vec![0; cpus.len()];
    for cpu in cpus {
        let index = cpu
            .get("cpu-index")
            .and_then(Value::as_u64)
            .ok_or_else(protocol)? as usize;
        let tid = cpu
            .get("thread-id")
            .and_then(Value::as_u64)
            .ok_or_else(protocol)?;
        *tids.get_mut(index).ok_or_else(protocol)? = u32::try_from(tid).map_err(|_| protocol())?;
    }
    Ok(tids)
}
