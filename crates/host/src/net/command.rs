//! Running `ip` and `nft`, with failures that quote the command line.

use std::io::Write;
use std::process::{Command, Stdio};

use super::NetError;

/// Runs `program args...`, feeding `stdin`, and returns its stdout.
pub(super) fn run(
    program: &'static str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, NetError> {
    tracing::debug!(program, ?args, "running");
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetError::Spawn { program, source })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|source| NetError::Spawn { program, source })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| NetError::Spawn { program, source })?;
    if !out.status.success() {
        return Err(NetError::Command {
            command: format!("{program} {}", args.join(" ")),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
