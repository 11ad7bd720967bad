//! The remote API: `oxvirt daemon --listen tcp:...` with its token file,
//! driven by the CLI with `--connect oxvirt+tcp://...` (and by raw HTTP
//! for the refusals): a missing, malformed or wrong token gets a 401 JSON
//! error and nothing happens; with the token every verb works as on the
//! unix socket, the console included; inside TLS, only a certificate of
//! the CA the client trusts is accepted.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::tls::{make_ca, make_server_cert};
use common::{oxvirt_bin, prerequisites, Daemon};
use daemon::client::{block_on, Client};
use daemon::remote::{ConnectUri, Token};

const TOKEN: &str = "s3cret-token-for-the-remote-api";
const CHECKER: &str = "probe=mem probe.mib=8 probe.dirty_mib_s=8 probe.verify=1";

/// A private token file in `dir`.
fn token_file(dir: &Path, text: &str, mode: u32) -> PathBuf {
    let path = dir.join("remote.token");
    std::fs::write(&path, format!("{text}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// The address the daemon recorded in `run/oxvirtd.tcp`.
fn listen_addr(d: &Daemon) -> String {
    std::fs::read_to_string(d.run_dir().join("oxvirtd.tcp"))
        .unwrap()
        .trim()
        .to_owned()
}

/// One raw HTTP request; returns the status line and the body.
fn http(addr: &str, request_line: &str, headers: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "{request_line} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// `oxvirt ARGS --connect URI` with the token in $OXVIRT_TOKEN (if any).
fn remote(uri: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(oxvirt_bin());
    command
        .args(args)
        .args(["--connect", uri])
        .env_remove("OXVIRT_DEFAULT_CONNECT_URI")
        .env_remove("OXVIRT_TOKEN_FILE");
    match token {
        Some(t) => command.env("OXVIRT_TOKEN", t),
        None => command.env_remove("OXVIRT_TOKEN"),
    };
    command.output().unwrap()
}

fn ok(uri: &str, args: &[&str]) -> String {
    let out = remote(uri, Some(TOKEN), args);
    assert!(
        out.status.success(),
        "oxvirt {args:?} over TCP: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(uri: &str, token: Option<&str>, args: &[&str]) -> String {
    let out = remote(uri, token, args);
    assert!(!out.status.success(), "oxvirt {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn heavy_daemon_refuses_a_missing_short_or_shared_token_file() {
    if !prerequisites() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let start = |token: &Path| {
        Command::new(oxvirt_bin())
            .args(["daemon", "--no-cgroups", "--listen", "tcp:127.0.0.1:0"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .arg("--token-file")
            .arg(token)
            .output()
            .unwrap()
    };
    let missing = dir.path().join("absent.token");
    let out = start(&missing);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("absent.token"),
        "{err}"
    );
    let shared = token_file(dir.path(), TOKEN, 0o644);
    let err = String::from_utf8_lossy(&start(&shared).stderr).into_owned();
    assert!(err.contains("chmod 600"), "{err}");
    let short = token_file(dir.path(), "short", 0o600);
    let err = String::from_utf8_lossy(&start(&short).stderr).into_owned();
    assert!(err.contains("at least 16"), "{err}");
    let bad = Command::new(oxvirt_bin())
        .args(["daemon", "--listen", "localhost:1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("expected tcp:ADDRESS:PORT"), "{err}");
}

#[test]
fn heavy_remote_api_needs_the_token_and_serves_every_verb() {
    if !prerequisites() {
        return;
    }
    let secrets = tempfile::tempdir().unwrap();
    let token = token_file(secrets.path(), TOKEN, 0o600);
    let d = Daemon::start_with(
        &[
            "--listen",
            "tcp:127.0.0.1:0",
            "--token-file",
            token.to_str().unwrap(),
        ],
        None,
    );
    let addr = listen_addr(&d);
    let uri = format!("oxvirt+tcp://{addr}/system");

    // Refusals: 401 with a JSON error that says what is wrong.
    for (headers, problem) in [
        ("", "missing `Authorization: Bearer TOKEN` header"),
        (
            "Authorization: Basic abc\r\n",
            "malformed Authorization header",
        ),
        (
            "Authorization: Bearer s3cret-token-for-the-remote-apj\r\n",
            "wrong token",
        ),
        ("Authorization: Bearer s3cret\r\n", "wrong token"),
    ] {
        let (status, body) = http(&addr, "GET /v1/domains?all=true", headers);
        assert!(status.contains("401"), "{status}");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(error["code"], "unauthorized");
        assert!(
            error["message"].as_str().unwrap().contains(problem),
            "{body}"
        );
    }
    let (status, _) = http(
        &addr,
        "GET /v1/version",
        &format!("Authorization: Bearer {TOKEN}\r\n"),
    );
    assert!(status.contains("200"), "{status}");
    let file = d.definition("far", CHECKER, "");
    let err = fails(&uri, None, &["define", file.to_str().unwrap()]);
    assert!(err.contains("missing `Authorization"), "{err}");
    let wrong = token_file(secrets.path(), "not-the-right-token", 0o600);
    let out = Command::new(oxvirt_bin())
        .args(["list", "--connect", &uri, "--token-file"])
        .arg(&wrong)
        .env_remove("OXVIRT_TOKEN")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong token"));
    assert!(d.ok(&["list", "--all", "--name"]).trim().is_empty());
    let err = fails(&uri.replace(&addr, "127.0.0.1:1"), Some(TOKEN), &["list"]);
    assert!(
        err.contains("cannot connect to oxvirtd at oxvirt+tcp://127.0.0.1:1"),
        "{err}"
    );

    // With the token, the verbs work as on the socket.
    let out = ok(&uri, &["define", file.to_str().unwrap()]);
    assert!(out.contains("Domain 'far' defined"), "{out}");
    assert!(ok(&uri, &["list", "--all"]).contains("far"));
    ok(&uri, &["autostart", "far"]);
    ok(&uri, &["setmem", "far", "96M", "--config"]);
    assert!(ok(&uri, &["dumpconfig", "far"]).contains("memory"));
    ok(&uri, &["setmem", "far", "64M", "--config"]);
    ok(&uri, &["start", "far"]);
    assert_eq!(
        ok(&uri, &["domstate", "far", "--reason"]),
        "running (booted)\n"
    );
    assert!(ok(&uri, &["dominfo", "far"]).contains("running"));
    assert!(ok(&uri, &["list"]).contains("far"));
    ok(
        &uri,
        &["schedinfo", "far", "--set", "cpu_shares=512", "--live"],
    );
    assert!(ok(&uri, &["schedinfo", "far"]).contains("512"));
    assert!(ok(&uri, &["memtune", "far"]).contains("hard_limit"));
    ok(&uri, &["vcpupin", "far", "0", "0", "--live"]);
    ok(&uri, &["migrate-setspeed", "far", "100"]);
    assert!(ok(&uri, &["domjobinfo", "far"]).contains("Job type"));
    ok(&uri, &["suspend", "far"]);
    assert_eq!(ok(&uri, &["domstate", "far"]), "paused\n");
    ok(&uri, &["resume", "far"]);
    ok(&uri, &["snapshot-create-as", "far", "remote"]);
    assert!(ok(&uri, &["snapshot-list", "far"]).contains("remote"));
    ok(&uri, &["snapshot-delete", "far", "remote"]);

    // The console's upgraded connection goes through the token check too.
    let tcp = ConnectUri::parse(&uri).unwrap();
    let client = Client::for_uri(tcp, Some(Token::from_text(TOKEN).unwrap()));
    let (keys, input) = tokio::sync::mpsc::channel(1);
    let mut seen = Vec::new();
    let end = block_on(async {
        let session = client.console("far", input, |bytes| seen.extend_from_slice(bytes));
        let stop = async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            keys.send(vec![daemon::client::CONSOLE_ESCAPE])
                .await
                .unwrap();
        };
        let (end, ()) = tokio::join!(session, stop);
        end
    })
    .unwrap()
    .unwrap();
    assert_eq!(end, daemon::client::ConsoleEnd::Detached);
    assert!(String::from_utf8_lossy(&seen).contains("pass="), "{seen:?}");

    let save = d.dir.path().join("far.state");
    ok(&uri, &["save", "far", save.to_str().unwrap()]);
    ok(&uri, &["restore", save.to_str().unwrap()]);
    ok(&uri, &["reboot", "far"]);
    ok(&uri, &["shutdown", "far"]);
    ok(&uri, &["start", "far"]);
    ok(&uri, &["destroy", "far"]);
    ok(&uri, &["autostart", "far", "--disable"]);
    ok(&uri, &["undefine", "far"]);
    assert!(ok(&uri, &["list", "--all", "--name"]).trim().is_empty());
}

#[test]
fn heavy_remote_api_over_tls_checks_the_certificate() {
    if !prerequisites() {
        return;
    }
    let secrets = tempfile::tempdir().unwrap();
    let dir = secrets.path();
    make_ca(dir, "ca");
    make_ca(dir, "stranger");
    make_server_cert(dir, "127.0.0.1");
    let token = token_file(dir, TOKEN, 0o600);
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let d = Daemon::start_with(
        &[
            "--listen",
            "tcp:127.0.0.1:0",
            "--token-file",
            &path("remote.token"),
            "--tls-cert",
            &path("server.pem"),
            "--tls-key",
            &path("server.key"),
        ],
        None,
    );
    assert!(token.exists());
    let addr = listen_addr(&d);
    let uri = format!("oxvirt+tls://{addr}/system");
    let with_ca = |ca: &str, token: &str, args: &[&str]| {
        Command::new(oxvirt_bin())
            .args(args)
            .args(["--connect", &uri, "--ca-file", &path(ca)])
            .env("OXVIRT_TOKEN", token)
            .output()
            .unwrap()
    };
    let ok = |args: &[&str]| {
        let out = with_ca("ca.pem", TOKEN, args);
        assert!(
            out.status.success(),
            "oxvirt {args:?} over TLS: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // A certificate of another CA, no CA at all, plain TCP, a wrong token.
    let out = with_ca("stranger.pem", TOKEN, &["list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("certificate"),
        "{err}"
    );
    let err = fails(&uri, Some(TOKEN), &["list"]);
    assert!(err.contains("needs --ca-file"), "{err}");
    let plain = format!("oxvirt+tcp://{addr}/system");
    assert!(!remote(&plain, Some(TOKEN), &["list"]).status.success());
    let out = with_ca("ca.pem", "not-the-right-token", &["list"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong token"));

    let file = d.definition("sealed", CHECKER, "");
    ok(&["define", file.to_str().unwrap()]);
    ok(&["start", "sealed"]);
    assert!(ok(&["dominfo", "sealed"]).contains("running"));
    ok(&["destroy", "sealed"]);
    ok(&["undefine", "sealed"]);
    assert!(ok(&["list", "--all", "--name"]).trim().is_empty());
}
