//! The host side of the serial console: where guest output goes and where
//! guest input comes from (stdio, a file, a unix socket; output while no
//! socket client is connected is kept, the last 64 KiB, for the next one).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::{Serial, SerialError};

use crate::config::SerialTarget;

/// Errors of the console's host side.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("serial file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("serial socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
}

/// A console's output writer, and a way to start its input once the
/// serial device exists.
pub struct Console {
    pub output: Box<dyn Write + Send>,
    pub input: Input,
}

/// The console's input side, started once the UART exists.
pub enum Input {
    Stdin,
    None,
    Socket {
        listener: UnixListener,
        client: Arc<Mutex<SocketClient>>,
    },
}

/// Output kept while no client is connected: the latest bytes, so that a
/// client attaching late (a manager, `console`) still sees the boot.
const BACKLOG: usize = 64 * 1024;

/// The connected console client, or what the guest printed meanwhile.
#[derive(Default)]
pub struct SocketClient {
    stream: Option<UnixStream>,
    backlog: std::collections::VecDeque<u8>,
}

impl SocketClient {
    fn keep(&mut self, buf: &[u8]) {
        let tail = &buf[buf.len().saturating_sub(BACKLOG)..];
        let overflow = (self.backlog.len() + tail.len()).saturating_sub(BACKLOG);
        self.backlog.drain(..overflow);
        self.backlog.extend(tail);
    }

    /// A new client gets the backlog first, then live output.
    fn attach(&mut self, mut stream: UnixStream) {
        let (a, b) = self.backlog.as_slices();
        if stream
            .write_all(a)
            .and_then(|()| stream.write_all(b))
            .is_ok()
        {
            self.backlog.clear();
            self.stream = Some(stream);
        }
    }
}

impl Console {
    pub fn open(target: &SerialTarget) -> Result<Self, ConsoleError> {
        match target {
            SerialTarget::Stdio => Ok(Console {
                output: Box::new(io::stdout()),
                input: Input::Stdin,
            }),
            SerialTarget::File(path) => {
                let file = File::create(path).map_err(|source| ConsoleError::File {
                    path: path.clone(),
                    source,
                })?;
                Ok(Console {
                    output: Box::new(file),
                    input: Input::None,
                })
            }
            SerialTarget::Unix(path) => {
                let listener = bind_socket(path).map_err(|source| ConsoleError::Socket {
                    path: path.clone(),
                    source,
                })?;
                let client = Arc::new(Mutex::new(SocketClient::default()));
                Ok(Console {
                    output: Box::new(SocketWriter(client.clone())),
                    input: Input::Socket { listener, client },
                })
            }
        }
    }
}

impl Input {
    /// Starts the thread that feeds host input to the guest's UART.
    pub fn start(self, serial: Arc<Mutex<Serial>>) {
        match self {
            Input::None => {}
            Input::Stdin => {
                std::thread::spawn(move || pump(io::stdin(), &serial));
            }
            Input::Socket { listener, client } => {
                std::thread::spawn(move || accept_clients(&listener, &client, &serial));
            }
        }
    }
}

/// Binds a listening socket at `path`, replacing a stale socket file (but
/// never another kind of file).
pub fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    UnixListener::bind(path)
}

/// Sends output to the connected client, or keeps it for the next one.
struct SocketWriter(Arc<Mutex<SocketClient>>);

impl Write for SocketWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut client = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match client.stream.as_mut() {
            Some(stream) => {
                if stream.write_all(buf).is_err() {
                    client.stream = None;
                }
            }
            None => client.keep(buf),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn accept_clients(
    listener: &UnixListener,
    client: &Arc<Mutex<SocketClient>>,
    serial: &Arc<Mutex<Serial>>,
) {
    for stream in listener.incoming().flatten() {
        let Ok(reader) = stream.try_clone() else {
            continue;
        };
        client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .attach(stream);
        let serial = serial.clone();
        std::thread::spawn(move || pump(reader, &serial));
    }
}

/// Copies `input` into the UART's receive FIFO until end of input, waiting
/// while the guest has not drained the FIFO.
fn pump(mut input: impl Read, serial: &Mutex<Serial>) {
    let mut buf = [0u8; 64];
    while let Ok(n @ 1..) = input.read(&mut buf) {
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let queued = serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .enqueue_input(pending);
            match queued {
                Ok(done) => pending = &pending[done..],
                Err(SerialError::FifoFull) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => {
                    tracing::warn!("serial input stopped: {e}");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_keeps_the_latest_output_for_the_next_client() {
        let mut client = SocketClient::default();
        client.keep(b"boot ");
        client.keep(&vec![b'x'; BACKLOG]);
        client.keep(b"login:");
        assert_eq!(client.backlog.len(), BACKLOG);
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        client.attach(theirs);
        let mut got = vec![0; BACKLOG];
        ours.read_exact(&mut got).unwrap();
        assert!(got.ends_with(b"xlogin:") && got.starts_with(b"xxxx"));
        assert!(client.backlog.is_empty() && client.stream.is_some());
    }
}
