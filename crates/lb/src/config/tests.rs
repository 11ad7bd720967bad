use super::*;

fn load_str(text: &str) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lb.conf");
    std::fs::write(&path, text).unwrap();
    Config::load(&path)
}

fn err(text: &str) -> String {
    load_str(text).unwrap_err().to_string()
}

#[test]
fn seed_scenario_3_config_loads() {
    let cfg = load_str(
        "worker_processes 1;\nevents { worker_connections 1024; }\nstream {\n  upstream proxy_7 {\n    server 127.0.0.1:8005;\n    server 127.0.0.1:8006 weight=3 max_fails=2 fail_timeout=5s;\n  }\n  server {\n    listen 80;\n    proxy_pass proxy_7; #注意,不带HTTP。\n    proxy_protocol on;\n  }\n}\n",
    )
    .unwrap();
    assert_eq!(cfg.servers.len(), 1);
    let s = &cfg.servers[0];
    assert_eq!(s.listens[0].addr, "0.0.0.0:80".parse().unwrap());
    assert_eq!(s.proxy.send_proxy_protocol, Some(ProxyVersion::V1));
    let up = &cfg.upstreams[s.upstream];
    assert_eq!(up.name, "proxy_7");
    assert_eq!(up.servers[1].weight, 3);
    assert_eq!(up.servers[1].max_fails, 2);
    assert_eq!(up.servers[1].fail_timeout, Duration::from_secs(5));
    assert_eq!(cfg.max_sessions, Some(1024));
}

#[test]
fn server_settings_inherit_from_stream() {
    let cfg = load_str(
        "stream {\n proxy_timeout 3s;\n proxy_protocol_version 2;\n allow 127.0.0.1;\n deny all;\n server { listen 127.0.0.1:1; proxy_pass 127.0.0.1:2; proxy_protocol on; }\n server { listen 127.0.0.1:3; proxy_pass 127.0.0.1:2; proxy_timeout 1m; allow all; }\n}\n",
    )
    .unwrap();
    let a = &cfg.servers[0].proxy;
    let b = &cfg.servers[1].proxy;
    assert_eq!(a.timeout, Duration::from_secs(3));
    assert_eq!(a.send_proxy_protocol, Some(ProxyVersion::V2));
    assert_eq!(a.access.len(), 2);
    assert_eq!(b.timeout, Duration::from_secs(60));
    assert_eq!(b.send_proxy_protocol, None);
    assert_eq!(b.access, vec![(Access::Allow, Cidr::ALL)]);
    assert_eq!(a.connect_timeout, Duration::from_secs(60));
}

#[test]
fn methods_and_peer_parameters() {
    let cfg = load_str(
        "stream {\n upstream a { hash $remote_addr consistent; server 127.0.0.1:1; server 127.0.0.1:2 down; }\n upstream b { random two least_conn; server 127.0.0.1:1 max_conns=5; }\n upstream c { least_conn; server 127.0.0.1:1 drain; server 127.0.0.1:2 backup; }\n server { listen 127.0.0.1:9; proxy_pass a; }\n}\n",
    )
    .unwrap();
    assert!(matches!(
        cfg.upstreams[0].method,
        Method::Hash {
            consistent: true,
            ..
        }
    ));
    assert!(cfg.upstreams[0].servers[1].down);
    assert_eq!(
        cfg.upstreams[1].method,
        Method::Random {
            two: true,
            least_conn: true
        }
    );
    assert_eq!(cfg.upstreams[1].servers[0].max_conns, 5);
    assert!(cfg.upstreams[2].servers[1].backup);
    assert!(cfg.upstreams[2].servers[0].drain && !cfg.upstreams[2].servers[1].drain);
}

#[test]
fn unsupported_directives_name_file_and_line() {
    let e = err("stream {\n server {\n  listen 127.0.0.1:1;\n  proxy_pass 127.0.0.1:2;\n  ssl_preread on;\n }\n}\n");
    assert!(e.ends_with("lb.conf:5: unsupported directive \"ssl_preread\" in server (oxvirt lb does not implement it)"), "{e}");
    let e = err("http { }\nstream { }\n");
    assert!(
        e.contains("lb.conf:1: unsupported directive \"http\" in main context"),
        "{e}"
    );
    let e = err("stream {\n upstream u {\n  server 127.0.0.1:1 slow_start=10s;\n }\n}\n");
    assert!(
        e.contains("lb.conf:3: unsupported server parameter \"slow_start=10s\""),
        "{e}"
    );
}

#[test]
fn semantic_errors_name_file_and_line() {
    let cases = [
        ("stream {\n server {\n listen 127.0.0.1:1;\n proxy_pass nowhere;\n }\n}\n", "lb.conf:4: \"nowhere\" is neither"),
        ("stream {\n server { listen 127.0.0.1:1; }\n}\n", "lb.conf:2: server has no \"proxy_pass\""),
        ("stream {\n proxy_timeout 5x;\n}\n", "lb.conf:2: invalid time \"5x\""),
        ("stream {\n limit_conn perip 1;\n}\n", "lb.conf:2: unknown limit_conn_zone \"perip\""),
        ("stream {\n log_format x '$nope';\n}\n", "lb.conf:2: unknown variable \"$nope\""),
        ("stream {\n upstream u { hash $remote_addr; server 127.0.0.1:1 backup; }\n}\n", "lb.conf:2: upstream \"u\": \"backup\""),
        ("stream {\n upstream u { least_conn;\n random; server 127.0.0.1:1; }\n}\n", "lb.conf:3: load balancing method redefined"),
        ("stream {\n upstream u { server 127.0.0.1; }\n}\n", "lb.conf:2: no port"),
        ("stream {\n server { listen 127.0.0.1:1 ssl; proxy_pass 127.0.0.1:2; }\n}\n", "unsupported \"listen\" parameter \"ssl\""),
        ("stream {\n server { listen 127.0.0.1:1; proxy_pass 127.0.0.1:2; }\n server { listen 127.0.0.1:1; proxy_pass 127.0.0.1:2; }\n}\n", "lb.conf:3: duplicate \"127.0.0.1:1\""),
        ("stream {\n server { listen 127.0.0.1:1; proxy_pass 127.0.0.1:2; health_check match=m; }\n}\n", "lb.conf:2: unknown match \"m\""),
        ("events {}\n", "no \"stream\" block"),
    ];
    for (text, want) in cases {
        let e = err(text);
        assert!(e.contains(want), "{text:?}\n got: {e}\nwant: {want}");
    }
}

#[test]
fn errors_inside_included_files_name_that_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("stream_conf.d")).unwrap();
    std::fs::write(
        dir.path().join("stream_conf.d/01_mysql.conf"),
        "upstream mysql {\n  server 127.0.0.1:3306;\n}\nserver {\n  listen 127.0.0.1:13306;\n  proxy_pass mysql;\n  bogus 1;\n}\n",
    )
    .unwrap();
    let main = dir.path().join("nginx.conf");
    std::fs::write(&main, "stream {\n    include stream_conf.d/*.conf;\n}\n").unwrap();
    let e = Config::load(&main).unwrap_err().to_string();
    assert!(
        e.contains("stream_conf.d/01_mysql.conf:7: unsupported directive \"bogus\""),
        "{e}"
    );
}

#[test]
fn health_check_and_match() {
    let cfg = load_str(
        "stream {\n match ok { send \"PING\\r\\n\"; expect ~ \"^\\+PONG\"; }\n upstream u { server 127.0.0.1:1; }\n server { listen 127.0.0.1:2; proxy_pass u; health_check interval=1s fails=2 passes=3 port=7 match=ok; }\n}\n",
    )
    .unwrap();
    let hc = cfg.servers[0].health_check.as_ref().unwrap();
    assert_eq!(
        (hc.interval, hc.fails, hc.passes, hc.port),
        (Duration::from_secs(1), 2, 3, Some(7))
    );
    let m = hc.check.as_ref().unwrap();
    assert_eq!(m.send, b"PING\r\n");
    assert!(matches!(&m.expect, Some(Expect::Regex(r)) if r.is_match(b"+PONG")));
}
