//! `oxvirt lb`: run or test an nginx `stream { }` configuration.

use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (nginx syntax, with a `stream` block).
    #[arg(short = 'c', long = "conf", value_name = "FILE")]
    config: PathBuf,
    /// Test the configuration and exit, like `nginx -t`.
    #[arg(short = 't', long = "test")]
    test: bool,
}

pub fn run(args: Args) -> anyhow::Result<u8> {
    let shown = args.config.display();
    if args.test {
        return match lb::Config::load(&args.config) {
            Ok(_) => {
                eprintln!("oxvirt lb: the configuration file {shown} syntax is ok");
                eprintln!("oxvirt lb: configuration file {shown} test is successful");
                Ok(0)
            }
            Err(e) => {
                eprintln!("oxvirt lb: [emerg] {e}");
                eprintln!("oxvirt lb: configuration file {shown} test failed");
                Ok(1)
            }
        };
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("OXVIRT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Another subcommand may have installed a subscriber already; keep it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    lb::run_file(&args.config).with_context(|| format!("oxvirt lb -c {shown}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_file(text: &str) -> u8 {
        let dir =
            std::env::temp_dir().join(format!("oxvirt-lb-t-{}-{}", std::process::id(), text.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("lb.conf");
        std::fs::write(&config, text).unwrap();
        let code = run(Args { config, test: true }).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        code
    }

    #[test]
    fn dash_t_exits_zero_on_a_good_file_and_one_on_errors() {
        assert_eq!(
            test_file("stream { server { listen 127.0.0.1:1; proxy_pass 127.0.0.1:2; } }"),
            0
        );
        assert_eq!(test_file("stream {\n server { listen 127.0.0.1:1; proxy_pass 127.0.0.1:2; ssl_preread on; }\n}\n"), 1);
        assert_eq!(test_file("stream {"), 1);
    }
}
