//! Migration URIs and the connections they name, for both ends.
//!
//! `tcp:` and `unix:` are bidirectional: the destination confirms over the
//! same connection (the return path) and multifd opens more connections to
//! the same address. `exec:`, `fd:` and `file:` are one-way: the end of the
//! stream is the completion.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Errors of URIs and connections.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("migration URI {uri:?}: {problem}")]
    BadUri { uri: String, problem: &'static str },
    #[error("migration {uri}: {what}: {source}")]
    Io {
        uri: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("migration {uri}: command exited with {status}")]
    CommandFailed { uri: String, status: String },
    #[error("migration {uri}: {what}")]
    Unsupported { uri: String, what: &'static str },
    #[error("migration {uri}: no connection for {what} within {secs} s")]
    AcceptTimeout {
        uri: String,
        what: &'static str,
        secs: u64,
    },
}

/// A parsed migration URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
    Exec(String),
    Fd(RawFd),
    File(PathBuf),
}

impl FromStr for MigrationUri {
    type Err = TransportError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        let bad = |problem| TransportError::BadUri {
            uri: uri.to_string(),
            problem,
        };
        let (scheme, rest) = uri
            .split_once(':')
            .ok_or_else(|| bad("expected SCHEME:..., one of tcp, unix, exec, fd, file"))?;
        match scheme {
            "tcp" => {
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
                let host = host.trim_start_matches('[').trim_end_matches(']');
                if host.is_empty() {
                    return Err(bad("empty host in tcp:HOST:PORT"));
                }
                let port = port
                    .parse()
                    .map_err(|_| bad("port in tcp:HOST:PORT is not a number from 0 to 65535"))?;
                Ok(MigrationUri::Tcp {
                    host: host.to_string(),
                    port,
                })
            }
            "unix" if !rest.is_empty() => Ok(MigrationUri::Unix(rest.into())),
            "exec" if !rest.trim().is_empty() => Ok(MigrationUri::Exec(rest.to_string())),
            "fd" => rest
                .parse::<RawFd>()
                .ok()
                .filter(|fd| *fd >= 0)
                .map(MigrationUri::Fd)
                .ok_or_else(|| bad("expected fd:N with N a file descriptor number")),
            "file" if !rest.is_empty() => Ok(MigrationUri::File(rest.into())),
            "unix" | "exec" | "file" => Err(bad("nothing after the scheme")),
            _ => Err(bad("unknown scheme, expected tcp, unix, exec, fd or file")),
        }
    }
}

impl std::fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationUri::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrationUri::Unix(p) => write!(f, "unix:{}", p.display()),
            MigrationUri::Exec(c) => write!(f, "exec:{c}"),
            MigrationUri::Fd(n) => write!(f, "fd:{n}"),
            MigrationUri::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// Takes ownership of descriptor `fd`, checking that it is open.
fn owned_fd(uri: &MigrationUri, fd: RawFd) -> Result<File, TransportError> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io_err(uri, "file descriptor is not open")(
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd:N` hands descriptor N to the migration (as QEMU's `fd:`
    // does); it is open (checked above) and nothing else in the process uses it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn io_err(uri: &MigrationUri, what: &'static str) -> impl Fn(io::Error) -> TransportError {
    let uri = uri.to_string();
    move |source| TransportError::Io {
        uri: uri.clone(),
        what,
        source,
    }
}

fn shell(command: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(command);
    cmd
}

/// A socket clone that can break a blocked write (cancel).
pub enum Interrupt {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Interrupt {
    pub fn interrupt(&self) {
        // Shutting down an already closed socket fails harmlessly.
        let _ = match self {
            Interrupt::Tcp(s) => s.shutdown(Shutdown::Both),
            Interrupt::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

/// The source's end of one connection.
pub enum Outgoing {
    Tcp(TcpStream),
    Unix(UnixStream),
    Exec {
        child: Child,
        stdin: ChildStdin,
    },
    Fd(File),
    File {
        file: File,
        temp: PathBuf,
        path: PathBuf,
    },
}

fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".oxvirt-partial-{}", std::process::id()));
    path.with_file_name(name)
}

impl Outgoing {
    /// Opens the main connection.
    pub fn connect(uri: &MigrationUri) -> Result<Self, TransportError> {
        match uri {
            MigrationUri::Tcp { host, port } => TcpStream::connect((host.as_str(), *port))
                .map(|s| {
                    // Page batches are large; small control writes must not wait.
                    let _ = s.set_nodelay(true);
                    Outgoing::Tcp(s)
                })
                .map_err(io_err(uri, "connecting")),
            MigrationUri::Unix(path) => UnixStream::connect(path)
                .map(Outgoing::Unix)
                .map_err(io_err(uri, "connecting")),
            MigrationUri::Exec(command) => {
                let mut child = shell(command)
                    .stdin(Stdio::piped())
                    .spawn()
                    .map_err(io_err(uri, "starting sh -c"))?;
                let stdin = child.stdin.take().ok_or_else(|| TransportError::Io {
                    uri: uri.to_string(),
                    what: "taking the command's stdin",
                    source: io::ErrorKind::BrokenPipe.into(),
                })?;
                Ok(Outgoing::Exec { child, stdin })
            }
            MigrationUri::Fd(fd) => owned_fd(uri, *fd).map(Outgoing::Fd),
            MigrationUri::File(path) => {
                let temp = temp_name(path);
                let file =
                    File::create(&temp).map_err(io_err(uri, "creating the temporary file"))?;
                Ok(Outgoing::File {
                    file,
                    temp,
                    path: path.clone(),
                })
            }
        }
    }

    /// Opens one more connection (multifd); only sockets have them.
    pub fn connect_extra(uri: &MigrationUri) -> Result<Self, TransportError> {
        match uri {
            MigrationUri::Tcp { .. } | MigrationUri::Unix(_) => Outgoing::connect(uri),
            _ => Err(TransportError::Unsupported {
                uri: uri.to_string(),
                what: "multifd needs a tcp: or unix: URI",
            }),
        }
    }

    /// The writing half.
    pub fn writer(&self) -> io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            Outgoing::Tcp(s) => Box::new(s.try_clone()?),
            Outgoing::Unix(s) => Box::new(s.try_clone()?),
            Outgoing::Exec { stdin, .. } => {
                let fd = std::os::fd::AsFd::as_fd(stdin).try_clone_to_owned()?;
                Box::new(File::from(fd))
            }
            Outgoing::Fd(f) | Outgoing::File { file: f, .. } => Box::new(f.try_clone()?),
        })
    }

    /// The destination's replies, where the transport has a return path.
    pub fn return_path(&self) -> io::Result<Option<Box<dyn Read + Send>>> {
        Ok(match self {
            Outgoing::Tcp(s) => Some(Box::new(s.try_clone()?)),
            Outgoing::Unix(s) => Some(Box::new(s.try_clone()?)),
            _ => None,
        })
    }

    /// The error message the destination sent back, if any arrives within
    /// a moment (a failed write usually means the destination gave up).
    pub fn destination_error(&self) -> Option<String> {
        let wait = Some(Duration::from_millis(200));
        let rp: Box<dyn Read> = match self {
            Outgoing::Tcp(s) => {
                let s = s.try_clone().ok()?;
                s.set_read_timeout(wait).ok()?;
                Box::new(s)
            }
            Outgoing::Unix(s) => {
                let s = s.try_clone().ok()?;
                s.set_read_timeout(wait).ok()?;
                Box::new(s)
            }
            _ => return None,
        };
        let mut reply = Vec::new();
        let _ = rp.take(4096).read_to_end(&mut reply);
        let message = reply.strip_prefix(b"ER")?;
        Some(String::from_utf8_lossy(message).into_owned())
    }

    /// A handle that breaks blocked writes, for cancel.
    pub fn interrupt(&self) -> Option<Interrupt> {
        match self {
            Outgoing::Tcp(s) => s.try_clone().ok().map(Interrupt::Tcp),
            Outgoing::Unix(s) => s.try_clone().ok().map(Interrupt::Unix),
            _ => None,
        }
    }

    /// Completes a one-way transport: the command must exit 0; a file is
    /// synced and renamed to its real name.
    pub fn finish(self, uri: &MigrationUri) -> Result<(), TransportError> {
        match self {
            Outgoing::Exec { mut child, stdin } => {
                drop(stdin);
                let status = child
                    .wait()
                    .map_err(io_err(uri, "waiting for the command"))?;
                if !status.success() {
                    return Err(TransportError::CommandFailed {
                        uri: uri.to_string(),
                        status: status.to_string(),
                    });
                }
                Ok(())
            }
            Outgoing::File { file, temp, path } => {
                let done = file
                    .sync_all()
                    .map_err(io_err(uri, "syncing the temporary file"))
                    .and_then(|()| {
                        std::fs::rename(&temp, &path)
                            .map_err(io_err(uri, "renaming the saved file"))
                    });
                if done.is_err() {
                    let _ = std::fs::remove_file(&temp);
                }
                done
            }
            Outgoing::Tcp(_) | Outgoing::Unix(_) | Outgoing::Fd(_) => Ok(()),
        }
    }

    /// Gives up: no file under the real name, the command is stopped.
    pub fn abort(self) {
        match self {
            Outgoing::File { temp, .. } => {
                let _ = std::fs::remove_file(temp);
            }
            Outgoing::Exec { mut child, stdin } => {
                drop(stdin);
                let _ = child.kill();
                let _ = child.wait();
            }
            Outgoing::Tcp(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Outgoing::Unix(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            Outgoing::Fd(_) => {}
        }
    }
}

/// One accepted incoming connection.
pub struct IncomingConn {
    pub reader: Box<dyn Read + Send>,
    /// Where the confirmation goes (sockets only).
    pub return_path: Option<Box<dyn Write + Send>>,
    /// Breaks a blocked read (sockets only).
    pub interrupt: Option<Interrupt>,
}

/// The destination's end: a listening socket or a one-way source.
pub enum Incoming {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Exec(Option<(Child, ChildStdout)>),
    Fd(Option<File>),
    File(Option<File>),
}

/// How long the destination waits for each multifd connection.
pub const EXTRA_ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

impl Incoming {
    /// Binds the listener or opens the source (`--incoming URI`).
    pub fn open(uri: &MigrationUri) -> Result<Self, TransportError> {
        match uri {
            MigrationUri::Tcp { host, port } => TcpListener::bind((host.as_str(), *port))
                .map(Incoming::Tcp)
                .map_err(io_err(uri, "listening")),
            MigrationUri::Unix(path) => {
                let listener = UnixListener::bind(path).map_err(io_err(uri, "listening"))?;
                Ok(Incoming::Unix {
                    listener,
                    path: path.clone(),
                })
            }
            MigrationUri::Exec(command) => {
                let mut child = shell(command)
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(io_err(uri, "starting sh -c"))?;
                let stdout = child.stdout.take().ok_or_else(|| TransportError::Io {
                    uri: uri.to_string(),
                    what: "taking the command's stdout",
                    source: io::ErrorKind::BrokenPipe.into(),
                })?;
                Ok(Incoming::Exec(Some((child, stdout))))
            }
            MigrationUri::Fd(fd) => owned_fd(uri, *fd).map(|f| Incoming::Fd(Some(f))),
            MigrationUri::File(path) => File::open(path)
                .map(|f| Incoming::File(Some(f)))
                .map_err(io_err(uri, "opening the saved file")),
        }
    }

    /// The URI a source should use (the bound port for `tcp:HOST:0`).
    pub fn local_uri(&self, uri: &MigrationUri) -> MigrationUri {
        match (self, uri) {
            (Incoming::Tcp(l), MigrationUri::Tcp { host, .. }) => match l.local_addr() {
                Ok(addr) => MigrationUri::Tcp {
                    host: host.clone(),
                    port: addr.port(),
                },
                Err(_) => uri.clone(),
            },
            _ => uri.clone(),
        }
    }

    /// Accepts the main connection (waits as long as it takes).
    pub fn accept(&mut self, uri: &MigrationUri) -> Result<IncomingConn, TransportError> {
        let one_way = |reader: Box<dyn Read + Send>| IncomingConn {
            reader,
            return_path: None,
            interrupt: None,
        };
        let taken = || TransportError::Unsupported {
            uri: uri.to_string(),
            what: "a one-way transport carries one stream only",
        };
        match self {
            Incoming::Tcp(l) => {
                let (s, _) = l.accept().map_err(io_err(uri, "accepting"))?;
                let _ = s.set_nodelay(true);
                socket_conn(uri, s)
            }
            Incoming::Unix { listener, .. } => {
                let (s, _) = listener.accept().map_err(io_err(uri, "accepting"))?;
                socket_conn(uri, s)
            }
            Incoming::Exec(pipe) => {
                let (child, stdout) = pipe.take().ok_or_else(taken)?;
                Ok(one_way(Box::new(ChildReader { child, stdout })))
            }
            Incoming::Fd(f) | Incoming::File(f) => {
                Ok(one_way(Box::new(f.take().ok_or_else(taken)?)))
            }
        }
    }

    /// Accepts one more connection (multifd) within [`EXTRA_ACCEPT_TIMEOUT`].
    pub fn accept_extra(&mut self, uri: &MigrationUri) -> Result<IncomingConn, TransportError> {
        let deadline = Instant::now() + EXTRA_ACCEPT_TIMEOUT;
        let timeout = || TransportError::AcceptTimeout {
            uri: uri.to_string(),
            what: "a multifd channel",
            secs: EXTRA_ACCEPT_TIMEOUT.as_secs(),
        };
        loop {
            let accepted = match self {
                Incoming::Tcp(l) => nonblocking_accept(l.set_nonblocking(true), || l.accept())
                    .map(|r| r.map(|(s, _)| socket_conn(uri, s))),
                Incoming::Unix { listener, .. } => {
                    nonblocking_accept(listener.set_nonblocking(true), || listener.accept())
                        .map(|r| r.map(|(s, _)| socket_conn(uri, s)))
                }
                _ => {
                    return Err(TransportError::Unsupported {
                        uri: uri.to_string(),
                        what: "multifd needs a tcp: or unix: URI",
                    })
                }
            }
            .map_err(io_err(uri, "accepting"))?;
            if let Some(conn) = accepted {
                return conn;
            }
            if Instant::now() >= deadline {
                return Err(timeout());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if let Incoming::Unix { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn nonblocking_accept<T>(
    set: io::Result<()>,
    accept: impl FnOnce() -> io::Result<T>,
) -> io::Result<Option<T>> {
    set?;
    match accept() {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// What the destination needs from an accepted socket.
trait Socket: Read + Write + Send + Sized + 'static {
    fn make_blocking(&self) -> io::Result<()>;
    fn duplicate(&self) -> io::Result<Self>;
    fn interrupt(self) -> Interrupt;
}

impl Socket for TcpStream {
    fn make_blocking(&self) -> io::Result<()> {
        self.set_nonblocking(false)
    }
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn interrupt(self) -> Interrupt {
        Interrupt::Tcp(self)
    }
}

impl Socket for UnixStream {
    fn make_blocking(&self) -> io::Result<()> {
        self.set_nonblocking(false)
    }
    fn duplicate(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn interrupt(self) -> Interrupt {
        Interrupt::Unix(self)
    }
}

fn socket_conn<S: Socket>(uri: &MigrationUri, s: S) -> Result<IncomingConn, TransportError> {
    let err = io_err(uri, "accepting");
    // Accepted sockets may inherit the listener's non-blocking mode.
    s.make_blocking().map_err(&err)?;
    let return_path = s.duplicate().map_err(&err)?;
    let interrupt = s.duplicate().map_err(&err)?.interrupt();
    Ok(IncomingConn {
        reader: Box::new(s),
        return_path: Some(Box::new(return_path)),
        interrupt: Some(interrupt),
    })
}

/// Reads a command's stdout; at its end the command must have exited 0.
struct ChildReader {
    child: Child,
    stdout: ChildStdout,
}

impl Read for ChildReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stdout.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let status = self.child.wait()?;
            if !status.success() {
                return Err(io::Error::other(format!(
                    "incoming command exited with {status}"
                )));
            }
        }
        Ok(n)
    }
}

impl Drop for ChildReader {
    fn drop(&mut self) {
        // A stream abandoned midway must not leave the command behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<MigrationUri, String> {
        s.parse().map_err(|e: TransportError| e.to_string())
    }

    #[test]
    fn uris_parse_and_print_back() {
        for uri in [
            "tcp:127.0.0.1:4444",
            "tcp:[::1]:4444",
            "unix:/run/mig.sock",
            "exec:gzip -c > /tmp/x.gz",
            "fd:5",
            "file:/var/lib/snap.bin",
        ] {
            assert_eq!(parse(uri).unwrap().to_string(), uri);
        }
        assert_eq!(
            parse("tcp:[::1]:80").unwrap(),
            MigrationUri::Tcp {
                host: "::1".into(),
                port: 80
            }
        );
    }

    #[test]
    fn bad_uris_say_what_is_wrong() {
        for (uri, problem) in [
            ("tcp:host", "expected tcp:HOST:PORT"),
            ("tcp:host:99999", "port in tcp:HOST:PORT"),
            ("tcp::80", "empty host"),
            ("fd:-1", "expected fd:N"),
            ("fd:x", "expected fd:N"),
            ("unix:", "nothing after the scheme"),
            ("rdma:1.2.3.4:5", "unknown scheme"),
            ("nothing", "expected SCHEME"),
        ] {
            let err = parse(uri).unwrap_err();
            assert!(err.contains(problem) && err.contains(uri), "{uri}: {err}");
        }
    }

    #[test]
    fn file_appears_only_when_finished() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let uri = MigrationUri::File(path.clone());
        let out = Outgoing::connect(&uri).unwrap();
        out.writer().unwrap().write_all(b"half").unwrap();
        assert!(!path.exists());
        out.abort();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "abort leaves nothing"
        );
        let out = Outgoing::connect(&uri).unwrap();
        out.writer().unwrap().write_all(b"whole").unwrap();
        out.finish(&uri).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole");
        let mut incoming = Incoming::open(&uri).unwrap();
        let mut got = Vec::new();
        incoming
            .accept(&uri)
            .unwrap()
            .reader
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, b"whole");
    }

    #[test]
    fn exec_streams_through_a_shell_pipeline() {
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("s.gz");
        let out_uri = MigrationUri::Exec(format!("gzip -c > {}", gz.display()));
        let out = Outgoing::connect(&out_uri).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        out.writer().unwrap().write_all(&data).unwrap();
        out.finish(&out_uri).unwrap();
        let in_uri = MigrationUri::Exec(format!("gunzip -c {}", gz.display()));
        let mut incoming = Incoming::open(&in_uri).unwrap();
        let mut got = Vec::new();
        incoming
            .accept(&in_uri)
            .unwrap()
            .reader
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, data);
        // A failing command is an error, on both ends.
        let bad = MigrationUri::Exec("cat > /dev/null; exit 3".into());
        let out = Outgoing::connect(&bad).unwrap();
        let err = out.finish(&bad).unwrap_err().to_string();
        assert!(err.contains("exit status: 3"), "{err}");
        let bad_in = MigrationUri::Exec("exit 4".into());
        let mut incoming = Incoming::open(&bad_in).unwrap();
        let err = incoming
            .accept(&bad_in)
            .unwrap()
            .reader
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(err.to_string().contains("exit status: 4"), "{err}");
    }

    #[test]
    fn fd_uri_checks_the_descriptor() {
        let err = Outgoing::connect(&MigrationUri::Fd(987_654)).err().unwrap();
        assert!(err.to_string().contains("fd:987654"), "{err}");
        let (a, mut b) = UnixStream::pair().unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(a);
        let out = Outgoing::connect(&MigrationUri::Fd(fd)).unwrap();
        out.writer().unwrap().write_all(b"via fd").unwrap();
        drop(out);
        let mut got = String::new();
        b.read_to_string(&mut got).unwrap();
        assert_eq!(got, "via fd");
    }

    #[test]
    fn tcp_has_a_return_path_and_extra_channels() {
        let uri: MigrationUri = "tcp:127.0.0.1:0".parse().unwrap();
        let mut incoming = Incoming::open(&uri).unwrap();
        let uri = incoming.local_uri(&uri);
        let out = Outgoing::connect(&uri).unwrap();
        let extra = Outgoing::connect_extra(&uri).unwrap();
        let mut main = incoming.accept(&uri).unwrap();
        let mut second = incoming.accept_extra(&uri).unwrap();
        out.writer().unwrap().write_all(b"m").unwrap();
        extra.writer().unwrap().write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        main.reader.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"m");
        second.reader.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        main.return_path.unwrap().write_all(b"OK").unwrap();
        let mut ok = [0u8; 2];
        out.return_path()
            .unwrap()
            .unwrap()
            .read_exact(&mut ok)
            .unwrap();
        assert_eq!(&ok, b"OK");
        assert!(Outgoing::connect_extra(&MigrationUri::File("/tmp/x".into())).is_err());
    }
}
