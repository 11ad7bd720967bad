//! The daemon's side of a domain's serial console. The VMM serves the
//! serial port on a unix socket (one client at a time); the daemon is that
//! client for the VMM's whole life: it appends what the guest writes to the
//! console log, passes it on to an attached `oxvirt console`, and forwards
//! that client's keystrokes to the guest.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// The HTTP `Upgrade` protocol name of a console session.
pub const PROTOCOL: &str = "oxvirt-console";

/// Output chunks queued for an attached client before it counts as stuck.
const CLIENT_QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("serial socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("console log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("a console session is already attached")]
    Busy,
    #[error("the serial console has closed")]
    Closed,
}

/// A domain's console relay; clones share it.
#[derive(Debug, Clone)]
pub(crate) struct ConsoleRelay {
    attached: Arc<Mutex<Option<mpsc::Sender<Vec<u8>>>>>,
    input: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
}

/// One attached client: guest output arrives on `output`; keystrokes go
/// through `send`.
pub(crate) struct Attachment {
    pub output: mpsc::Receiver<Vec<u8>>,
    relay: ConsoleRelay,
}

impl ConsoleRelay {
    /// Connects to the VMM's serial socket, retrying while `starting`
    /// says so (the VMM binds it early in its start), and starts copying
    /// to `log` (appended).
    pub async fn connect(
        socket: &Path,
        log: &Path,
        mut starting: impl FnMut() -> bool,
    ) -> Result<ConsoleRelay, ConsoleError> {
        let stream = loop {
            match UnixStream::connect(socket).await {
                Ok(stream) => break stream,
                Err(source) if !starting() => {
                    return Err(ConsoleError::Connect {
                        path: socket.to_owned(),
                        source,
                    })
                }
                // Polled briefly: output before we connect is lost.
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        };
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| ConsoleError::Log {
                path: log.to_owned(),
                source,
            })?;
        let (read, write) = stream.into_split();
        let relay = ConsoleRelay {
            attached: Arc::new(Mutex::new(None)),
            input: Arc::new(tokio::sync::Mutex::new(write)),
        };
        tokio::spawn(relay.clone().copy_output(read, log_file, log.to_owned()));
        Ok(relay)
    }

    fn client(&self) -> std::sync::MutexGuard<'_, Option<mpsc::Sender<Vec<u8>>>> {
        self.attached.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn copy_output(
        self,
        mut read: tokio::net::unix::OwnedReadHalf,
        mut log: std::fs::File,
        log_path: PathBuf,
    ) {
        let mut buf = vec![0u8; 4096];
        while let Ok(n @ 1..) = read.read(&mut buf).await {
            let chunk = &buf[..n];
            if let Err(e) = log.write_all(chunk) {
                tracing::warn!(log = %log_path.display(), error = %e, "console log write failed");
            }
            let mut client = self.client();
            if let Some(tx) = client.as_ref() {
                // A client that stopped reading is detached rather than
                // letting it hold up the log.
                if tx.try_send(chunk.to_vec()).is_err() {
                    *client = None;
                }
            }
        }
        // Dropping the sender ends an attached session.
        self.client().take();
    }

    /// Attaches a client; only one at a time (as virsh).
    pub fn attach(&self) -> Result<Attachment, ConsoleError> {
        let mut client = self.client();
        if client.as_ref().is_some_and(|tx| !tx.is_closed()) {
            return Err(ConsoleError::Busy);
        }
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        *client = Some(tx);
        Ok(Attachment {
            output: rx,
            relay: self.clone(),
        })
    }

    async fn send(&self, bytes: &[u8]) -> Result<(), ConsoleError> {
        let mut input = self.input.lock().await;
        input
            .write_all(bytes)
            .await
            .map_err(|_| ConsoleError::Closed)
    }
}

impl Attachment {
    /// Forwards keystrokes to the guest.
    pub async fn send(&self, bytes: &[u8]) -> Result<(), ConsoleError> {
        self.relay.send(bytes).await
    }
}

impl Attachment {
    /// Runs a session over `io` (the client's upgraded connection) until
    /// the client leaves or the console closes.
    pub async fn serve<T: AsyncRead + AsyncWrite>(mut self, io: T) {
        let (mut from_client, mut to_client) = tokio::io::split(io);
        let mut buf = [0u8; 1024];
        loop {
            tokio::select! {
                out = self.output.recv() => match out {
                    Some(chunk) => {
                        if to_client.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                read = from_client.read(&mut buf) => match read {
                    Ok(n @ 1..) => {
                        if self.send(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    _ => break,
                },
            }
        }
        // Best effort: the client may be gone already.
        let _ = to_client.shutdown().await;
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.output.close();
        let mut client = self.relay.client();
        if client.as_ref().is_some_and(mpsc::Sender::is_closed) {
            *client = None;
        }
    }
}
