//! The control socket: JSON commands and replies, one per line, in QMP's
//! shape (`{"execute": "stop"}` -> `{"return": {}}`, errors as
//! `{"error": {"class": ..., "desc": ...}}`, events as
//! `{"event": "STOP", "timestamp": {...}, "data": {...}}`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A command the VMM executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    QueryStatus,
    Stop,
    Cont,
    SystemReset,
    Quit,
    QueryCpus,
    QueryBlock,
    QueryBlockstats,
    BlockSetIoThrottle,
    QueryNet,
    NetSetThrottle,
    SetLink,
    Migrate,
    MigrateCancel,
    QueryMigrate,
    MigrateSetCapabilities,
    QueryMigrateCapabilities,
    MigrateSetParameters,
    QueryMigrateParameters,
}

impl Command {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "query-status" => Command::QueryStatus,
            "stop" => Command::Stop,
            "cont" => Command::Cont,
            "system_reset" => Command::SystemReset,
            "quit" => Command::Quit,
            "query-cpus" | "query-cpus-fast" => Command::QueryCpus,
            "query-block" => Command::QueryBlock,
            "query-blockstats" => Command::QueryBlockstats,
            "block_set_io_throttle" => Command::BlockSetIoThrottle,
            "query-net" => Command::QueryNet,
            "net_set_throttle" => Command::NetSetThrottle,
            "set_link" => Command::SetLink,
            "migrate" => Command::Migrate,
            "migrate_cancel" => Command::MigrateCancel,
            "query-migrate" => Command::QueryMigrate,
            "migrate-set-capabilities" => Command::MigrateSetCapabilities,
            "query-migrate-capabilities" => Command::QueryMigrateCapabilities,
            "migrate-set-parameters" => Command::MigrateSetParameters,
            "query-migrate-parameters" => Command::QueryMigrateParameters,
            _ => return None,
        })
    }
}

/// A command's error as QMP reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub class: &'static str,
    pub desc: String,
}

pub type Reply = Result<Value, CommandError>;

/// A command on its way to the VMM's main loop, with where to answer.
pub struct ApiRequest {
    pub command: Command,
    /// The request's `arguments` object (`{}` when absent).
    pub args: Value,
    pub reply: Sender<Reply>,
}

type Writer = Arc<Mutex<UnixStream>>;

/// The listening socket and its connected clients (all get events).
pub struct ApiServer {
    path: PathBuf,
    clients: Arc<Mutex<Vec<Writer>>>,
}

/// Longest command line accepted; a longer one closes the connection.
const MAX_LINE: usize = 64 * 1024;

impl ApiServer {
    /// Listens on `path`; every request goes to `submit`.
    pub fn start(
        path: &Path,
        submit: impl Fn(ApiRequest) + Send + Sync + 'static,
    ) -> Result<Self, ApiError> {
        let listener = crate::console::bind_socket(path).map_err(|source| ApiError::Bind {
            path: path.to_owned(),
            source,
        })?;
        let clients: Arc<Mutex<Vec<Writer>>> = Arc::default();
        let submit = Arc::new(submit);
        let accepted = clients.clone();
        std::thread::spawn(move || accept(&listener, &accepted, &submit));
        Ok(ApiServer {
            path: path.to_owned(),
            clients,
        })
    }

    /// Sends an event to every connected client.
    pub fn emit(&self, event: &str, data: Value) {
        let line = event_line(event, data);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients.retain(|c| write_line(c, &line));
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // The socket file is ours; a failure only leaves a stale file.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn event_line(event: &str, data: Value) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({
        "event": event,
        "data": data,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
    })
    .to_string()
}

fn write_line(writer: &Writer, line: &str) -> bool {
    let mut stream = writer.lock().unwrap_or_else(|p| p.into_inner());
    stream
        .write_all(line.as_bytes())
        .and_then(|()| stream.write_all(b"\n"))
        .is_ok()
}

fn accept<F: Fn(ApiRequest) + Send + Sync + 'static>(
    listener: &UnixListener,
    clients: &Arc<Mutex<Vec<Writer>>>,
    submit: &Arc<F>,
) {
    for stream in listener.incoming().flatten() {
        let Ok(reader) = stream.try_clone() else {
            continue;
        };
        let writer = Arc::new(Mutex::new(stream));
        let greeting = json!({"QMP": {"version": {"package": concat!("oxvirt ", env!("CARGO_PKG_VERSION"))}, "capabilities": []}});
        if !write_line(&writer, &greeting.to_string()) {
            continue;
        }
        clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(writer.clone());
        let submit = submit.clone();
        std::thread::spawn(move || serve(reader, &writer, submit.as_ref()));
    }
}

fn serve(reader: UnixStream, writer: &Writer, submit: &(impl Fn(ApiRequest) + ?Sized)) {
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE as u64 + 1).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) if n > MAX_LINE => {
                write_line(
                    writer,
                    &error_json(None, "GenericError", "command line longer than 64 KiB"),
                );
                return;
            }
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let Some(answer) = answer(&line, writer, submit) else {
            return;
        };
        if !write_line(writer, &answer) {
            return;
        }
    }
}

fn error_json(id: Option<&Value>, class: &str, desc: &str) -> String {
    let mut v = json!({"error": {"class": class, "desc": desc}});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v.to_string()
}

/// The reply line to one request line; `None` once the VMM quits.
fn answer(line: &str, writer: &Writer, submit: &(impl Fn(ApiRequest) + ?Sized)) -> Option<String> {
    let request: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return Some(error_json(
                None,
                "GenericError",
                &format!("JSON parse error: {e}"),
            ))
        }
    };
    let id = request.get("id");
    let Some(name) = request.get("execute").and_then(Value::as_str) else {
        return Some(error_json(
            id,
            "GenericError",
            "expected an object with a string member \"execute\"",
        ));
    };
    if name == "qmp_capabilities" {
        return Some(with_id(json!({"return": {}}), id));
    }
    let Some(command) = Command::parse(name) else {
        return Some(error_json(
            id,
            "CommandNotFound",
            &format!("The command {name} has not been found"),
        ));
    };
    let args = request.get("arguments").cloned().unwrap_or(json!({}));
    if !args.is_object() {
        return Some(error_json(
            id,
            "GenericError",
            "\"arguments\" must be an object",
        ));
    }
    let (tx, rx) = mpsc::channel();
    let request = ApiRequest {
        command,
        args,
        reply: tx,
    };
    if command == Command::Quit {
        // Answer first: once the request is handled the VMM is gone.
        write_line(writer, &with_id(json!({"return": {}}), id));
        submit(request);
        return None;
    }
    submit(request);
    Some(match rx.recv() {
        Ok(Ok(value)) => with_id(json!({ "return": value }), id),
        Ok(Err(e)) => error_json(id, e.class, &e.desc),
        Err(_) => error_json(id, "GenericError", "the VMM is shutting down"),
    })
}

fn with_id(mut v: Value, id: Option<&Value>) -> String {
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v.to_string()
}
