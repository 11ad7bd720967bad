//! `oxvirt console DOM`: the guest's serial port on this terminal until
//! Ctrl-] (the terminal in raw mode while attached, when it is one).

use std::io::{IsTerminal, Read, Write};

use daemon::client::{block_on, Client, ConsoleEnd};
use nix::sys::termios::{self, SetArg, Termios};

/// Attaches to `domain`'s console; exit status 0 when detached or when
/// the domain's console closed.
pub fn attach(client: &Client, domain: &str) -> anyhow::Result<u8> {
    eprintln!("Connected to domain '{domain}'");
    eprintln!("Escape character is ^] (Ctrl + ])");
    let raw = RawTerminal::enter();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // A plain thread: a blocking stdin read must not hold up the runtime's
    // shutdown once the session ends.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = stdin.read(&mut buf) {
            if tx.blocking_send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut stdout = std::io::stdout();
    let end = block_on(client.console(domain, rx, |bytes| {
        // Best effort: a closed stdout only loses the guest's output.
        let _ = stdout.write_all(bytes).and_then(|()| stdout.flush());
    }))?;
    drop(raw);
    match end? {
        ConsoleEnd::Detached => eprintln!("\r\nDetached from domain '{domain}'"),
        ConsoleEnd::Closed => eprintln!("\r\nThe console of domain '{domain}' closed"),
    }
    Ok(0)
}

/// The terminal's settings before raw mode, restored on drop.
struct RawTerminal(Option<Termios>);

impl RawTerminal {
    fn enter() -> Self {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return RawTerminal(None);
        }
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return RawTerminal(None);
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        match termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw) {
            Ok(()) => RawTerminal(Some(saved)),
            Err(_) => RawTerminal(None),
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // Best effort: nothing more can be done if the terminal is gone.
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, saved);
        }
    }
}
